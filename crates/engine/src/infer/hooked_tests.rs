//! Edit hooks, `run_with_cache` and head views on the tiny fixtures (tests/fixtures/<family>/).

use crate::infer::extract::hidden_last;
use crate::model::hooks::{Edit, Hook, HookSpec, Positions};
use crate::Model;
use candle_core::Tensor;
use std::path::{Path, PathBuf};

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn load(name: &str) -> Model {
    Model::load(&fixture_dir(name)).unwrap()
}

/// The fixture's prompts (65, 60 and 121 tokens for llama; they share a template head).
fn prompts(name: &str) -> Vec<Vec<u32>> {
    let p = fixture_dir(name).join("expected.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Bit-equality without printing two vocabularies of numbers on failure.
fn assert_bit_equal(a: &Tensor, b: &Tensor, what: &str) {
    assert!(
        rows(a) == rows(b),
        "{what}: differ by up to {}",
        max_diff(a, b)
    );
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn adding_a_zero_direction_leaves_logits_bit_equal() {
    let m = load("llama");
    let p = prompts("llama");
    let h = m.cfg().hidden_size;
    let zero = Tensor::zeros(h, candle_core::DType::F32, &m.decoder.device).unwrap();
    for pos in [Positions::Last, Positions::All] {
        // The same path without the edit (every-position hooks run without the shared head).
        let plain = HookSpec::none().read(Hook::ResidPre(1), pos);
        let plain = m.decoder.run_with_hooks(&p, &plain, 2).unwrap();
        let spec = HookSpec::none().edit(
            Hook::ResidPre(1),
            pos,
            Edit::Add {
                direction: zero.clone(),
                coeff: 3.0,
            },
        );
        let edited = m.decoder.run_with_hooks(&p, &spec, 2).unwrap();
        assert_bit_equal(&edited, &plain, &format!("{pos:?}"));
    }
    let plain = m.decoder.run_with_hooks(&p, &HookSpec::none(), 2).unwrap();
    // A non-zero direction does change them (the edit is really applied).
    let one = (zero + 1.0).unwrap();
    let spec = HookSpec::none().edit(
        Hook::ResidPre(1),
        Positions::Last,
        Edit::Add {
            direction: one,
            coeff: 3.0,
        },
    );
    assert!(max_diff(&m.decoder.run_with_hooks(&p, &spec, 2).unwrap(), &plain) > 1e-3);
}

#[test]
fn zero_ablating_attn_out_equals_zeroing_o_proj() {
    let p = prompts("llama");
    let m = load("llama");
    let k = 2;
    let spec = HookSpec::none().edit(Hook::AttnOut(k), Positions::All, Edit::Zero);
    let ablated = m.decoder.run_with_hooks(&p, &spec, 2).unwrap();
    let plain = m.decoder.run_with_hooks(&p, &HookSpec::none(), 2).unwrap();
    assert!(
        max_diff(&ablated, &plain) > 1e-3,
        "the ablation changes nothing"
    );
    let mut z = load("llama");
    assert!(z.decoder.layers[k].attn.o.bias.is_none());
    let o = z.decoder.layers[k].attn.o.weight.tensor_mut().unwrap();
    *o = o.zeros_like().unwrap();
    let zeroed = z.decoder.run_with_hooks(&p, &HookSpec::none(), 2).unwrap();
    assert!(
        max_diff(&ablated, &zeroed) < 1e-5,
        "{}",
        max_diff(&ablated, &zeroed)
    );
    // A user closure can do the same.
    let spec = HookSpec::none().edit(
        Hook::AttnOut(k),
        Positions::All,
        Edit::custom(|x| Ok((x * 0.0)?)),
    );
    let custom = m.decoder.run_with_hooks(&p, &spec, 2).unwrap();
    assert_bit_equal(&custom, &ablated, "closure");
}

#[test]
fn patching_resid_pre_with_another_prompts_cache_gives_its_logits() {
    let m = load("llama");
    let a = prompts("llama")[0].clone();
    let mut b = a.clone();
    let n = b.len();
    b[n - 6..n - 2].copy_from_slice(&[300, 301, 302, 303]);
    let (b_logits, b_cache) = m
        .decoder
        .run_with_cache(&[&b[..]], &["resid_pre.2"], Positions::All, 1)
        .unwrap();
    let a_logits = m
        .decoder
        .run_with_hooks(&[&a[..]], &HookSpec::none(), 1)
        .unwrap();
    assert!(
        max_diff(&a_logits, &b_logits) > 1e-3,
        "the prompts give the same logits"
    );
    let patch = b_cache.by_name("resid_pre.2").unwrap().clone();
    assert_eq!(patch.dims(), &[1, n, m.cfg().hidden_size]);
    let spec = HookSpec::none().edit(Hook::ResidPre(2), Positions::All, Edit::Replace(patch));
    let patched = m.decoder.run_with_hooks(&[&a[..]], &spec, 1).unwrap();
    assert_bit_equal(&patched, &b_logits, "patched");
}

#[test]
fn per_prompt_patches_follow_their_prompts_through_batches() {
    // Patching the final norm at the last token with another prompt's gives that prompt's
    // logits, row by row, with prompts of different lengths batched, padded and sharing a head.
    let m = load("llama");
    let p = prompts("llama");
    let q = vec![p[2].clone(), p[0].clone(), p[1].clone()];
    let (q_logits, q_cache) = m
        .decoder
        .run_with_cache(&q, &["final_norm"], Positions::Last, 2)
        .unwrap();
    let patch = q_cache
        .get(Hook::FinalNorm, Positions::Last)
        .unwrap()
        .clone();
    let spec = HookSpec::none().edit(Hook::FinalNorm, Positions::Last, Edit::Replace(patch));
    let patched = m.decoder.run_with_hooks(&p, &spec, 2).unwrap();
    assert!(max_diff(&patched, &q_logits) < 1e-5);
}

#[test]
fn last_token_edits_are_the_same_batched_and_alone() {
    let m = load("gemma2");
    let p = prompts("gemma2");
    let dir = m.decoder.embed.tensor().unwrap().get(7).unwrap();
    let spec = HookSpec::none().edit(
        Hook::ResidPost(0),
        Positions::Last,
        Edit::Add {
            direction: dir,
            coeff: 4.0,
        },
    );
    let batched = m.decoder.run_with_hooks(&p, &spec, 3).unwrap();
    for (i, prompt) in p.iter().enumerate() {
        let alone = m.decoder.run_with_hooks(&[prompt], &spec, 1).unwrap();
        let d = max_diff(&alone, &batched.narrow(0, i, 1).unwrap());
        assert!(d < 1e-4, "prompt {i}: {d}");
    }
}

#[test]
fn projecting_out_removes_the_component() {
    let m = load("qwen3");
    let p = prompts("qwen3");
    let d = m.decoder.embed.tensor().unwrap().get(11).unwrap();
    for pos in [Positions::Last, Positions::All] {
        let spec = HookSpec::none()
            .edit(Hook::ResidPost(1), pos, Edit::ProjectOut(d.clone()))
            .read(Hook::ResidPost(1), pos);
        let (_, before) = m
            .decoder
            .run_with_cache(&p, &["resid_post.1"], pos, 2)
            .unwrap();
        let (_, after) = m.decoder.run_batched(&p, &spec, 2).unwrap();
        let dots = |t: &Tensor| {
            t.broadcast_mul(&d)
                .unwrap()
                .sum(candle_core::D::Minus1)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let x_before = before.get(Hook::ResidPost(1), pos).unwrap();
        let x_after = after.get(Hook::ResidPost(1), pos).unwrap();
        assert!(dots(x_before) > 1e-2, "{pos:?}: no component to remove");
        assert!(dots(x_after) < 1e-4, "{pos:?}: {} left", dots(x_after));
    }
}

#[test]
fn run_with_cache_equals_extraction() {
    let m = load("gemma2");
    let p = prompts("gemma2");
    let l = m.cfg().num_layers;
    let names: Vec<String> = (0..=l).map(|k| format!("hidden.{k}")).collect();
    let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let (logits, cache) = m
        .decoder
        .run_with_cache(&p, &names, Positions::Last, 2)
        .unwrap();
    assert_eq!(logits.dims(), &[3, m.cfg().vocab_size]);
    let hidden = hidden_last(&m.decoder, &p, 2, &mut |_| {}).unwrap();
    for (i, h) in hidden.iter().enumerate() {
        for (k, name) in names.iter().enumerate() {
            let got = cache.by_name(name).unwrap().get(i).unwrap();
            assert_eq!(
                got.to_vec1::<f32>().unwrap(),
                h.get(k).unwrap().to_vec1::<f32>().unwrap(),
                "prompt {i} {name}"
            );
        }
    }
    let e = m
        .decoder
        .run_with_cache(&p, &["resid_pre.3", "mlp_in.1"], Positions::Last, 2)
        .unwrap_err();
    assert!(format!("{e:#}").contains("mlp_in.1"), "{e:#}");
}

#[test]
fn head_views_are_slices_of_the_checkpoint_tensors() {
    // llama stores q/k/v apart (4 query heads, 2 key/value heads); phi3 stores them fused.
    for family in ["llama", "phi3"] {
        let m = load(family);
        let cfg = m.cfg();
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let w = candle_core::safetensors::load(
            fixture_dir(family).join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for layer in [0, cfg.num_layers - 1] {
            let name = |s: &str| format!("model.layers.{layer}.self_attn.{s}.weight");
            let (q, k, v) = match w.get(&name("qkv_proj")) {
                Some(f) => (
                    f.narrow(0, 0, nh * hd).unwrap(),
                    f.narrow(0, nh * hd, nkv * hd).unwrap(),
                    f.narrow(0, (nh + nkv) * hd, nkv * hd).unwrap(),
                ),
                None => (
                    w[&name("q_proj")].clone(),
                    w[&name("k_proj")].clone(),
                    w[&name("v_proj")].clone(),
                ),
            };
            let o = &w[&name("o_proj")];
            for head in 0..nh {
                let hw = m.decoder.head_weights(layer, head).unwrap();
                let g = head / (nh / nkv);
                assert_eq!(hw.kv_head, g);
                let want = [
                    (&hw.q, q.narrow(0, head * hd, hd).unwrap()),
                    (&hw.k, k.narrow(0, g * hd, hd).unwrap()),
                    (&hw.v, v.narrow(0, g * hd, hd).unwrap()),
                    (&hw.o, o.narrow(1, head * hd, hd).unwrap()),
                ];
                for (got, want) in want {
                    assert_bit_equal(got, &want, &format!("{family} layer {layer} head {head}"));
                }
            }
        }
        assert!(m.decoder.head_weights(0, nh).is_err());
    }
}
