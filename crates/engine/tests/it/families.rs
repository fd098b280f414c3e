//! Equality with transformers for every family, on the tiny random checkpoints and reference
//! outputs written by tools/fixtures/make_family_fixtures.py (tests/fixtures/<family>/).

use crate::common::fixture as fixture_dir;
use serde_json::Value;
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::{HookSpec, LayerRange, Logits, Model};

const FAMILIES: &[&str] = &[
    "llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
];

fn expected(name: &str) -> Value {
    let p = fixture_dir(name).join("expected.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

pub(crate) fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub(crate) fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// |a - b| <= tol * max(1, |b|).
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        // A NaN error (or a NaN worst so far) counts as worse: it must show up in the report.
        if err.partial_cmp(&worst.0).is_none_or(|o| o.is_gt()) {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: max relative error {} at {} (got {}, want {})",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

/// Per prompt: last-token hidden states of every entry, last-token logits, 12 greedy tokens.
pub(crate) struct Outputs {
    pub(crate) hidden: Vec<Vec<Vec<f32>>>,
    pub(crate) logits: Vec<Vec<f32>>,
    pub(crate) greedy: Vec<Vec<u32>>,
}

/// Runs each prompt alone (batch 1), as the fixture script does.
pub(crate) fn run_single(m: &Model, prompts: &[Vec<u32>]) -> Outputs {
    let d = &m.decoder;
    let l = d.num_layers();
    let mut hidden = Vec::new();
    let mut logits = Vec::new();
    for p in prompts {
        let ids = candle_core::Tensor::new(p.as_slice(), &d.device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (lg, cap) = d
            .forward(
                &ids,
                &[0],
                None,
                &HookSpec::all_hidden_last(l),
                Logits::Last,
            )
            .unwrap();
        hidden.push(
            (0..=l)
                .map(|k| {
                    cap.get(
                        sl_engine::Hook::hidden_entry(k, l),
                        sl_engine::Positions::Last,
                    )
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                })
                .collect(),
        );
        logits.push(lg.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let opts = GenerateOptions {
        max_new_tokens: 12,
        batch_size: 1,
        ..Default::default()
    };
    let greedy = greedy(d, prompts, &m.eos_token_ids, &opts, &mut |_| {}).unwrap();
    Outputs {
        hidden,
        logits,
        greedy,
    }
}

fn compare(out: &Outputs, exp: &Value, family: &str, what: &str) {
    for (p, (h, want)) in out
        .hidden
        .iter()
        .zip(exp["hidden_last"].as_array().unwrap())
        .enumerate()
    {
        let want = want.as_array().unwrap();
        assert_eq!(
            h.len(),
            want.len(),
            "{family} {what}: number of hidden-state entries"
        );
        for (k, (hk, wk)) in h.iter().zip(want).enumerate() {
            assert_close(
                hk,
                &floats(wk),
                1e-4,
                &format!("{family} {what}: prompt {p} hidden entry {k}"),
            );
        }
    }
    for (p, (lg, want)) in out
        .logits
        .iter()
        .zip(exp["logits_last"].as_array().unwrap())
        .enumerate()
    {
        assert_close(
            lg,
            &floats(want),
            1e-4,
            &format!("{family} {what}: prompt {p} logits"),
        );
    }
    for (p, (g, want)) in out
        .greedy
        .iter()
        .zip(exp["greedy"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(g, &ids(want), "{family} {what}: prompt {p} greedy tokens");
    }
}

fn check_family(family: &str) {
    let dir = fixture_dir(family);
    let exp = expected(family);
    let mut m = Model::load(&dir).unwrap_or_else(|e| panic!("{family}: {e:#}"));
    let texts: Vec<String> = exp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.encode(t, true).unwrap())
        .collect();
    for (p, want) in prompts.iter().zip(exp["input_ids"].as_array().unwrap()) {
        assert_eq!(p, &ids(want), "{family}: tokenizer ids");
    }
    compare(&run_single(&m, &prompts), &exp, family, "unscaled");

    // Batched with left padding equals one by one.
    let l = m.decoder.num_layers();
    let batched =
        sl_engine::infer::extract::hidden_last(&m.decoder, &prompts, 8, &mut |_| {}).unwrap();
    for (p, t) in batched.iter().enumerate() {
        for (k, row) in t.to_vec2::<f32>().unwrap().iter().enumerate() {
            assert_close(
                row,
                &floats(&exp["hidden_last"][p][k]),
                1e-4,
                &format!("{family}: batched prompt {p} entry {k}"),
            );
        }
    }
    assert_eq!(batched[0].dim(0).unwrap(), l + 1);
    let opts = GenerateOptions {
        max_new_tokens: 12,
        batch_size: 8,
        ..Default::default()
    };
    let g = greedy(&m.decoder, &prompts, &m.eos_token_ids, &opts, &mut |_| {}).unwrap();
    for (p, want) in g.iter().zip(exp["greedy"].as_array().unwrap()) {
        assert_eq!(p, &ids(want), "{family}: batched greedy");
    }
    // The KV cache changes nothing.
    let nc = GenerateOptions {
        no_cache: true,
        ..opts.clone()
    };
    let g2 = greedy(&m.decoder, &prompts, &m.eos_token_ids, &nc, &mut |_| {}).unwrap();
    assert_eq!(g, g2, "{family}: greedy with and without the KV cache");

    // Scaled layers.
    let sc = &exp["scaled"];
    let r = sc["range"].as_array().unwrap();
    let range = LayerRange::new(
        r[0].as_u64().unwrap() as usize,
        r[1].as_u64().unwrap() as usize,
        l,
    )
    .unwrap();
    let before = run_single(&m, &prompts);
    let rep = m
        .decoder
        .scale_layers(range, sc["alpha"].as_f64().unwrap())
        .unwrap();
    assert_eq!(
        rep.matrices.len(),
        7 * range.len(),
        "{family}: every q,k,v,o,gate,up,down scaled"
    );
    compare(&run_single(&m, &prompts), sc, family, "scaled");
    m.decoder.restore_scaling();
    let after = run_single(&m, &prompts);
    assert!(
        after.hidden == before.hidden && after.logits == before.logits,
        "{family}: undoing the scaling gives back bit-identical outputs"
    );
    compare(
        &run_single(&m, &prompts),
        &exp,
        family,
        "after undoing the scaling",
    );

    // The GPU's path (candle's device-generic ops for masks and attention), run on the CPU:
    // the same outputs, padded batches and the KV cache included.
    m.decoder.use_portable_ops(true);
    compare(
        &run_single(&m, &prompts),
        &exp,
        family,
        "device-generic ops",
    );
    let g3 = greedy(&m.decoder, &prompts, &m.eos_token_ids, &opts, &mut |_| {}).unwrap();
    assert_eq!(g, g3, "{family}: batched greedy on the device-generic ops");
}

fn check_v4_config(family: &str) {
    let dir = fixture_dir(family);
    let v4 = dir.join("config_v4.json");
    if !v4.exists() {
        panic!("{family}: config_v4.json missing");
    }
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "config.json" || name == "config_v4.json" {
            continue;
        }
        std::fs::copy(e.path(), tmp.path().join(&name)).unwrap();
    }
    std::fs::copy(&v4, tmp.path().join("config.json")).unwrap();
    let m5 = Model::load(&dir).unwrap();
    let m4 = Model::load(tmp.path()).unwrap_or_else(|e| panic!("{family} v4 config: {e:#}"));
    assert_eq!(
        format!("{:?}", m4.cfg().rope),
        format!("{:?}", m5.cfg().rope),
        "{family}: rope from v4 and v5 layouts"
    );
    assert_eq!(
        format!("{:?}", m4.cfg().rope_local),
        format!("{:?}", m5.cfg().rope_local),
        "{family}: local rope"
    );
    assert_eq!(
        m4.cfg().layer_types,
        m5.cfg().layer_types,
        "{family}: layer types"
    );
    let exp = expected(family);
    let texts: Vec<String> = exp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m4.tokenizer.encode(t, true).unwrap())
        .collect();
    compare(&run_single(&m4, &prompts), &exp, family, "v4 config");
}

macro_rules! family_tests {
    ($($name:ident => $fam:expr),* $(,)?) => {
        mod equal_to_transformers {
            $( #[test] fn $name() { super::check_family($fam); } )*
        }
        mod v4_config_layout {
            $( #[test] fn $name() { super::check_v4_config($fam); } )*
        }
    };
}

family_tests! {
    llama => "llama",
    llama3 => "llama3",
    mistral => "mistral",
    qwen2 => "qwen2",
    qwen3 => "qwen3",
    gemma => "gemma",
    gemma2 => "gemma2",
    gemma3 => "gemma3",
    phi3 => "phi3",
}

#[test]
fn every_family_has_a_fixture() {
    for f in FAMILIES {
        assert!(
            fixture_dir(f).join("expected.json").exists(),
            "missing fixture for {f}"
        );
    }
}

/// The hook points tell one consistent story: resid_post(k) = resid_pre(k+1) =
/// resid_pre(k) + attn_out(k) + mlp_out(k), and stopping early changes nothing.
#[test]
fn hook_points_are_consistent() {
    use sl_engine::{Hook, Positions};
    let m = Model::load(&fixture_dir("gemma2")).unwrap();
    let d = &m.decoder;
    let ids = m
        .tokenizer
        .encode(
            "Below is an instruction. Name three colours of the rainbow, please.",
            true,
        )
        .unwrap();
    let ids = candle_core::Tensor::new(ids.as_slice(), &d.device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = d.num_layers();
    let mut hooks = vec![(Hook::FinalNorm, Positions::Last)];
    for k in 0..l {
        for h in [
            Hook::ResidPre(k),
            Hook::ResidPost(k),
            Hook::AttnOut(k),
            Hook::MlpOut(k),
        ] {
            hooks.push((h, Positions::All));
        }
    }
    let spec = HookSpec {
        reads: hooks,
        edits: vec![],
    };
    let cap = d.activations(&ids, &[0], None, &spec).unwrap();
    let get = |h: Hook| {
        cap.get(h, Positions::All)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for k in 0..l {
        let sum: Vec<f32> = get(Hook::ResidPre(k))
            .iter()
            .zip(get(Hook::AttnOut(k)))
            .zip(get(Hook::MlpOut(k)))
            .map(|((a, b), c)| a + b + c)
            .collect();
        assert_close(
            &sum,
            &get(Hook::ResidPost(k)),
            1e-5,
            &format!("layer {k} residual sum"),
        );
        if k + 1 < l {
            assert_eq!(get(Hook::ResidPost(k)), get(Hook::ResidPre(k + 1)));
        }
    }
    // Asking only for an early layer stops there and gives the same tensor.
    let early = HookSpec::none().read(Hook::ResidPre(2), Positions::Last);
    assert_eq!(early.layers_needed(), Some(2));
    let cap2 = d.activations(&ids, &[0], None, &early).unwrap();
    let all = get(Hook::ResidPre(2));
    let h = m.cfg().hidden_size;
    assert_eq!(
        cap2.get(Hook::ResidPre(2), Positions::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        all[all.len() - h..]
    );
    assert_eq!(Hook::parse("hidden.4", l).unwrap(), Hook::FinalNorm);
    assert_eq!(Hook::parse("resid_pre.1", l).unwrap(), Hook::ResidPre(1));
    assert!(Hook::parse("mlp_out.9", l).is_err());
}

/// The training pass (fused ops with backward passes, rows packed without padding) computes the
/// same logits as the inference kernels at every real position.
#[test]
fn training_pass_equals_inference_path() {
    use sl_engine::train::forward::{forward, Packed};
    for family in ["gemma2", "gemma3", "phi3", "qwen3"] {
        let m = Model::load(&fixture_dir(family)).unwrap();
        let d = &m.decoder;
        let rows: Vec<Vec<u32>> = expected(family)["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        let (t, pads) = sl_engine::infer::generate::left_pad(&refs, &d.device).unwrap();
        let fast = d.logits(&t, &pads, None, Logits::All).unwrap();
        let packed = Packed::new(d, &refs).unwrap();
        let (h, _) = forward(d, &packed, None).unwrap();
        let slow = d.lm_logits(&h).unwrap();
        for (b, &pad) in pads.iter().enumerate() {
            let len = rows[b].len();
            let f = fast.get(b).unwrap().narrow(0, pad, len).unwrap();
            let s = slow.narrow(0, packed.seqs[b].0, len).unwrap();
            assert_close(
                &s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &f.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                1e-4,
                &format!("{family}: row {b} logits, training pass vs inference"),
            );
        }
    }
}

/// `--scale-target residual` against transformers with forward hooks multiplying layers 1-2's
/// attention and MLP contributions (after any post-norm) by 1.2
/// (tools/fixtures/make_residual_scale_fixtures.py); the weight target's cancellations are
/// named on exactly the families where transformers shows them (a q/k-only or v/o/down-only
/// weight scaling moving the logits by less than 1e-3).
#[test]
fn residual_scaling_equals_transformers_and_cancellations_are_named() {
    for family in ["llama", "qwen3", "gemma2", "gemma3"] {
        let dir = fixture_dir(family);
        let exp: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected_residual.json")).unwrap(),
        )
        .unwrap();
        let mut m = Model::load(&dir).unwrap();
        let prompts: Vec<Vec<u32>> = exp["residual"]["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let l = m.decoder.num_layers();
        let before = run_single(&m, &prompts);
        let range = LayerRange::new(1, 2, l).unwrap();
        let rep = m
            .decoder
            .scale_layers_with(range, 1.2, sl_engine::ScaleTarget::Residual)
            .unwrap();
        assert!(rep.matrices.is_empty(), "{family}: no matrix is scaled");
        compare(
            &run_single(&m, &prompts),
            &exp["residual"],
            family,
            "residual x1.2",
        );
        m.decoder.restore_scaling();
        let after = run_single(&m, &prompts);
        assert!(
            after.hidden == before.hidden && after.logits == before.logits,
            "{family}: undoing the residual scaling gives back bit-identical outputs"
        );

        let notes = m.decoder.weight_scaling_notes().join("; ");
        let moved = &exp["weights_only_logit_move"];
        let cancelled = |what: &str| moved[what].as_f64().unwrap() < 1e-3;
        assert_eq!(
            notes.contains("q/k norms"),
            cancelled("q_k"),
            "{family}: q/k cancellation ({notes})"
        );
        assert_eq!(
            notes.contains("post-attention norm") && notes.contains("post-feedforward norm"),
            cancelled("v_o_down"),
            "{family}: v/o/down cancellation ({notes})"
        );
    }
}
