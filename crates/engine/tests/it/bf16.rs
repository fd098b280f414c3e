//! `--dtype bf16` against transformers, on the family fixtures and the shared SmolLM2 GGUF
//! (references from tools/fixtures/make_bf16_fixtures.py). Two references per family:
//! (a) `bf16_compute`, transformers with the model cast to bf16, computing in bf16; (b)
//! `bf16_weights_f32_compute`, the same weights rounded to bf16 but f32 math. Our bf16 path
//! holds (b)'s weights and computes in f32, so it must equal (b) as closely as the f32 path equals
//! transformers, and be about as far from (a) as transformers' own bf16 compute is from (b).

use crate::common::{fixture as fixture_dir, root, shared, skip_without_shared};
use crate::families::{floats, ids, run_single};
use candle_core::DType;
use serde_json::Value;
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::io::loader::WeightDType;
use sl_engine::{LoadOptions, Logits, Model, PromptRecord, Template};
use std::path::Path;

/// The f32 path's tolerance against transformers in families.rs: |got - want| <= 1e-4 *
/// max(1, |want|) per value.
const F32_TOL: f32 = 1e-4;

fn json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn load(path: &Path, dtype: WeightDType) -> Model {
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    Model::load_with(path, &opts).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// Largest per-value error |got - want| / max(1, |want|), as families.rs measures.
fn elementwise(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, |a, e| if e.is_nan() || e > a { e } else { a })
}

/// max|got - want| / max|want| over one row: the measure dist_ab is recorded in.
fn row_dist(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    let num = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, |a, e| if e.is_nan() || e > a { e } else { a });
    num / want.iter().fold(0.0f32, |a, w| a.max(w.abs()))
}

/// Whether prompt `p`'s greedy tokens `g` equal (a)'s; where they leave (a), (a)'s own top-two
/// margin at that step must be within `noise` (relative to its largest logit) of bf16 rounding.
fn same_as_a_or_within_noise(family: &str, p: usize, g: &[u32], a: &Value, noise: f32) -> bool {
    let want = ids(&a["greedy"][p]);
    match g.iter().zip(&want).position(|(x, y)| x != y) {
        None if g.len() == want.len() => true,
        None => panic!("{family}: prompt {p}: {g:?} vs (a) {want:?}: lengths differ"),
        Some(i) => {
            let margin = a["step_margin"][p][i].as_f64().unwrap() as f32;
            let scale = a["step_max_abs"][p][i].as_f64().unwrap() as f32;
            assert!(
                margin <= noise * scale,
                "{family}: prompt {p} leaves (a) at step {i}, where (a)'s margin {margin} is \
                 above bf16 noise ({noise} * {scale})"
            );
            false
        }
    }
}

/// A row to check: what it is, ours, (b)'s, (a)'s.
type Row<'a> = (String, &'a [f32], Vec<f32>, Vec<f32>);

/// Under the forced `avx512bf16` level the CPU path no longer computes f32 math on the bf16
/// weights, which is what the (b)-exact tests hold it to (`dot_in_bf16` tests that level).
fn f32_math_on_bf16_weights() -> bool {
    use sl_engine::kernels::simd::{self, Level};
    let on = simd::level() != Level::Avx512Bf16;
    if !on {
        eprintln!("SKIPPED: the avx512bf16 level rounds activations to bf16; see dot_in_bf16");
    }
    on
}

fn check_family(family: &str) {
    if !f32_math_on_bf16_weights() {
        return;
    }
    let dir = fixture_dir(family);
    let exp = json(&dir.join("expected_bf16.json"));
    let m = load(&dir, WeightDType::Bf16);
    let f32_bytes = load(&dir, WeightDType::F32).decoder.weight_bytes();

    // (i) The matrices are held as bf16: two bytes a value, half the f32 load.
    assert_eq!(m.weight_storage, "bf16", "{family}: weight storage");
    assert_eq!(
        m.decoder.weight_bytes() * 2,
        f32_bytes,
        "{family}: bf16 bytes"
    );

    let prompts: Vec<Vec<u32>> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    for (t, want) in exp["prompts"].as_array().unwrap().iter().zip(&prompts) {
        assert_eq!(
            &m.tokenizer.encode(t.as_str().unwrap(), true).unwrap(),
            want
        );
    }
    let out = run_single(&m, &prompts);
    let (hidden, logits, greedy_out) = (out.hidden, out.logits, out.greedy);
    let a = &exp["bf16_compute"];
    let b = &exp["bf16_weights_f32_compute"];
    let dist_ab = exp["dist_ab"].as_f64().unwrap() as f32;
    // Our rows are within F32_TOL of (b), (b)'s within dist_ab of (a) (measured over every row,
    // so per row it is a bound), so ours lie within about dist_ab + F32_TOL of (a); the factor 2
    // covers that dist_ab is relative to max|b| where this is relative to max|a| (they differ by
    // up to dist_ab) and the fixture's 6 significant digits.
    let tol_a = 2.0 * dist_ab + F32_TOL;
    let (mut worst_b, mut worst_a) = (0f32, 0f32);
    for p in 0..prompts.len() {
        let mut rows: Vec<Row> = hidden[p]
            .iter()
            .enumerate()
            .map(|(k, h)| {
                (
                    format!("prompt {p} hidden entry {k}"),
                    h.as_slice(),
                    floats(&b["hidden_last"][p][k]),
                    floats(&a["hidden_last"][p][k]),
                )
            })
            .collect();
        assert_eq!(rows.len(), b["hidden_last"][p].as_array().unwrap().len());
        rows.push((
            format!("prompt {p} logits"),
            &logits[p],
            floats(&b["logits_last"][p]),
            floats(&a["logits_last"][p]),
        ));
        for (what, got, want_b, want_a) in &rows {
            // (ii) Equal to (b), the same weights in f32 math, as the f32 path equals transformers.
            let eb = elementwise(got, want_b);
            assert!(eb <= F32_TOL, "{family} {what}: {eb:e} from (b)");
            // (iii) As close to (a) as transformers' own bf16 compute is to (b).
            let ea = row_dist(got, want_a);
            assert!(
                ea <= tol_a,
                "{family} {what}: {ea:e} from (a), tolerance {tol_a:e}"
            );
            worst_b = worst_b.max(eb);
            worst_a = worst_a.max(ea);
        }
    }

    // (iv) Greedy tokens equal to (b) exactly. Against (a): the tiny random models have top-2
    // margins in the bf16 rounding range, where transformers' bf16 and f32 computes themselves
    // part ways (make_bf16_fixtures.py prints their agreement); so wherever ours leaves (a), (a)'s
    // own margin at that step must be within its bf16 noise, 2 * dist_ab * max|logit|.
    let mut same_a = 0;
    for (p, g) in greedy_out.iter().enumerate() {
        assert_eq!(
            g,
            &ids(&b["greedy"][p]),
            "{family}: prompt {p} greedy vs (b)"
        );
        same_a += usize::from(same_as_a_or_within_noise(family, p, g, a, 2.0 * dist_ab));
    }
    eprintln!(
        "{family}: dist_ab {dist_ab:.3e}; ours vs (b) {worst_b:.3e} (elementwise), vs (a) \
         {worst_a:.3e} (row); greedy = (b) {n}/{n}, = (a) {same_a}/{n}",
        n = prompts.len()
    );
}

macro_rules! family_tests {
    ($($name:ident),* $(,)?) => {
        mod equal_to_transformers_bf16 {
            $( #[test] fn $name() { super::check_family(stringify!($name)); } )*
        }
    };
}

family_tests!(llama, llama3, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3);

const SMOL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF loaded as bf16 holds what `convert --dtype bf16` writes: matrices dequantized then
/// rounded to bf16, bit for bit. The 1-D norm weights are the exception: convert rounds them to
/// bf16 where the loader keeps the file's f32 (so the fixture's f32 reference uses the GGUF's
/// norms); here they must equal convert's once rounded.
#[test]
fn smollm2_gguf_bf16_weights_are_what_convert_writes() {
    if skip_without_shared(&[SMOL]) {
        return;
    }
    let gguf = shared().join(SMOL);
    let loaded =
        sl_engine::io::gguf::GgufModel::load(&gguf, sl_engine::io::loader::WeightDType::Bf16)
            .unwrap()
            .weights
            .into_tensors()
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    sl_engine::io::hf_dir::convert_gguf(&gguf, &out, DType::BF16).unwrap();
    let files = sl_engine::io::weights::safetensors_files(&out).unwrap();
    let converted = sl_engine::io::weights::load_safetensors(&files, "converted", None).unwrap();
    assert_eq!(converted.source_dtype, DType::BF16, "convert writes bf16");
    // Both widen to f32 here (exactly, for bf16 values), so f32 equality is bit equality.
    let converted = converted.into_tensors().unwrap();
    let mut names: Vec<&String> = loaded.keys().collect();
    names.sort();
    assert_eq!(names.len(), converted.len(), "same tensors");
    let vals = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let round = |t: &candle_core::Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32);
    let (mut matrices, mut vectors) = (0, 0);
    for name in names {
        let (l, c) = (&loaded[name], &converted[name]);
        if l.rank() == 2 {
            matrices += 1;
            // Held as bf16 values (rounding changes nothing) and the same bits as convert's.
            assert!(
                vals(l) == vals(&round(l).unwrap()),
                "{name}: not bf16 values"
            );
            assert!(vals(l) == vals(c), "{name}: matrix differs from convert's");
        } else {
            vectors += 1;
            assert!(
                vals(&round(l).unwrap()) == vals(c),
                "{name}: vector differs"
            );
        }
    }
    assert!(matrices > 0 && vectors > 0);
}

/// Greedy 16 tokens for 16 paper-normal prompts against transformers on the same bf16 weights.
/// Transformers' own bf16 and f32 computes agree on 13 of the 16 (make_bf16_fixtures.py prints
/// it), so agreement with (a) is checked step by step, not counted.
#[test]
fn smollm2_gguf_bf16_equals_transformers() {
    if !f32_math_on_bf16_weights() {
        return;
    }
    if skip_without_shared(&[SMOL]) {
        return;
    }
    let fx = json(&root().join("tests/fixtures/gguf/smollm2_bf16_expected.json"));
    let m = load(&shared().join(SMOL), WeightDType::Bf16);
    assert_eq!(m.weight_storage, "bf16");
    let results = fx["results"].as_array().unwrap();
    assert_eq!(results.len(), 16);
    let records: Vec<PromptRecord> = results
        .iter()
        .map(|r| PromptRecord::new(r["instruction"].as_str().unwrap()))
        .collect();
    let prompts = m.prompts(&records, Template::Alpaca).unwrap();
    let rows: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    for (p, r) in rows.iter().zip(results) {
        assert_eq!(p, &ids(&r["input_ids"]), "ids of {:?}", r["instruction"]);
    }
    let opts = GenerateOptions {
        max_new_tokens: 16,
        batch_size: 1,
        ..Default::default()
    };
    let outs = greedy(&m.decoder, &rows, &m.eos_token_ids, &opts, &mut |_| {}).unwrap();
    let dist_ab = fx["dist_ab"].as_f64().unwrap() as f32;
    let (mut same_a, mut same_b, mut top1_b) = (0, 0, 0);
    for ((o, r), p) in outs.iter().zip(results).zip(&rows) {
        same_b += (o == &ids(&r["bf16_weights_f32_compute"]["greedy"])) as usize;
        let a = &r["bf16_compute"];
        let want = ids(&a["greedy"]);
        match o.iter().zip(&want).position(|(x, y)| x != y) {
            None if o.len() == want.len() => same_a += 1,
            None => panic!(
                "{:?}: {o:?} vs (a) {want:?}: lengths differ",
                r["instruction"]
            ),
            // As for the families: a flip away from (a) only where (a)'s margin is bf16 noise.
            Some(i) => {
                let margin = a["step_margin"][i].as_f64().unwrap() as f32;
                let scale = a["step_max_abs"][i].as_f64().unwrap() as f32;
                assert!(
                    margin <= 2.0 * dist_ab * scale,
                    "{:?} leaves (a) at step {i}, where (a)'s margin {margin} is above bf16 \
                     noise (2 * {dist_ab} * {scale})",
                    r["instruction"]
                );
            }
        }
        let t = candle_core::Tensor::new(p.as_slice(), &m.decoder.device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lg = m
            .decoder
            .logits(&t, &[0], None, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let top = &r["bf16_weights_f32_compute"]["top5_last"];
        let got: Vec<f32> = ids(&top["ids"]).iter().map(|&i| lg[i as usize]).collect();
        // 30 layers of f32 math in another order: the GGUF test's 1e-3.
        let e = elementwise(&got, &floats(&top["values"]));
        assert!(
            e <= 1e-3,
            "{:?}: top-5 logits {e:e} from (b)",
            r["instruction"]
        );
        let best = (0..lg.len())
            .max_by(|&x, &y| lg[x].total_cmp(&lg[y]))
            .unwrap();
        top1_b += (best as u64 == top["ids"][0].as_u64().unwrap()) as usize;
    }
    eprintln!(
        "smollm2 bf16: dist_ab {dist_ab:.3e}; greedy = (b) {same_b}/16, = (a) {same_a}/16, \
         top-1 = (b) {top1_b}/16"
    );
    assert_eq!(
        same_b, 16,
        "greedy equal to transformers' f32 compute on the bf16 weights"
    );
    assert_eq!(top1_b, 16, "last-token argmax equal to (b)");
}

/// The GPU's bf16 path (matrices dense in bf16, bf16 activations, candle's matmul, f32 norms and
/// softmax), run on the CPU (`Compute::Portable`), or the CPU path with its decode-size matmuls
/// in `vdpbf16ps` on bf16-rounded activations (`Compute::DotBf16`, the forced `avx512bf16`
/// level). Each computes partly in bf16 as (a) does, in another order: so it must lie as far
/// from the f32-math reference (b) as bf16 compute does, `2 * dist_ab + F32_TOL` per row, and
/// leave (a)'s greedy tokens only where (a)'s own margin is within the noise of two bf16
/// computations (`4 * dist_ab * max|logit|`).
fn check_bf16_compute(family: &str, compute: Compute) {
    let dir = fixture_dir(family);
    let exp = json(&dir.join("expected_bf16.json"));
    let mut m = load(&dir, WeightDType::Bf16);
    if compute == Compute::Portable {
        m.decoder.use_portable_ops_as(DType::BF16).unwrap();
        assert_eq!(m.decoder.dtype(), DType::BF16);
    }
    let prompts: Vec<Vec<u32>> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let out = run_single(&m, &prompts);
    let (a, b) = (&exp["bf16_compute"], &exp["bf16_weights_f32_compute"]);
    let dist_ab = exp["dist_ab"].as_f64().unwrap() as f32;
    let tol = 2.0 * dist_ab + F32_TOL;
    let mut worst = 0f32;
    for p in 0..prompts.len() {
        let mut rows: Vec<(String, &[f32], Vec<f32>)> = out.hidden[p]
            .iter()
            .enumerate()
            .map(|(k, h)| {
                let want = floats(&b["hidden_last"][p][k]);
                (format!("prompt {p} hidden entry {k}"), h.as_slice(), want)
            })
            .collect();
        rows.push((
            format!("prompt {p} logits"),
            &out.logits[p],
            floats(&b["logits_last"][p]),
        ));
        for (what, got, want) in &rows {
            let e = row_dist(got, want);
            assert!(
                e <= tol,
                "{family} {what}: {e:e} from (b), tolerance {tol:e}"
            );
            worst = worst.max(e);
        }
    }
    let mut same_a = 0;
    for (p, g) in out.greedy.iter().enumerate() {
        same_a += usize::from(same_as_a_or_within_noise(family, p, g, a, 4.0 * dist_ab));
    }
    eprintln!(
        "{family} ({compute:?}): vs (b) {worst:.3e} (row, tolerance {tol:.3e}); greedy = (a) \
         {same_a}/{}",
        prompts.len()
    );
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Compute {
    Portable,
    DotBf16,
}

/// The `vdpbf16ps` level is chosen per process and never by `auto`, so its tests run only in a
/// process started with `SAFETY_LAYERS_SIMD=avx512bf16` on a CPU that has it (.ci/run does
/// that where it can); elsewhere they say so, and fail when `SAFETY_LAYERS_REQUIRE_SIMD` names
/// the level.
fn check_dot_bf16(family: &str) {
    use sl_engine::kernels::simd::{self, Level};
    if simd::level() != Level::Avx512Bf16 {
        let required = std::env::var("SAFETY_LAYERS_REQUIRE_SIMD").unwrap_or_default();
        let msg = format!(
            "{family}: SKIPPED the vdpbf16ps path: kernels run {} (it needs \
             SAFETY_LAYERS_SIMD=avx512bf16 and a CPU with AVX-512 BF16)",
            simd::describe()
        );
        assert!(
            !required.split(',').any(|r| r.trim() == "avx512bf16"),
            "{msg}"
        );
        eprintln!("{msg}");
        return;
    }
    check_bf16_compute(family, Compute::DotBf16);
}

macro_rules! bf16_compute_tests {
    ($($name:ident),* $(,)?) => {
        mod gpu_path_bf16_on_the_cpu {
            $( #[test] fn $name() {
                super::check_bf16_compute(stringify!($name), super::Compute::Portable);
            } )*
        }
        mod dot_in_bf16 {
            $( #[test] fn $name() { super::check_dot_bf16(stringify!($name)); } )*
        }
    };
}

bf16_compute_tests!(llama, llama3, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3);
