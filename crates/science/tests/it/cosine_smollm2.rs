//! `--pairs all` on the real SmolLM2 GGUF with the paper's 100 + 100 prompts equals the
//! transformers-computed statistics (tools/fixtures/make_cosine_fixtures.py) within 1e-3.

use crate::common::{root, shared, skip_without_shared};
use sl_engine::text::prompts::read_prompts;
use sl_engine::{Model, Template};
use sl_science::cosine::curves;
use sl_science::cosine::report::{analyse, vectors, CosineConfig, PromptSet};
use sl_science::cosine::Pairs;

#[test]
fn all_pairs_equal_transformers() {
    if skip_without_shared(&["models/SmolLM2-135M-Instruct.Q4_1.gguf", "data/paper"]) {
        return;
    }
    let root = root();
    let shared = shared();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/cosine/smollm2_all_pairs.json"))
            .unwrap(),
    )
    .unwrap();
    let model = Model::load(&shared.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let set = |f: &str| PromptSet {
        name: f.to_string(),
        records: read_prompts(&shared.join("data/paper").join(f), None).unwrap(),
        sha256: String::new(),
    };
    let (normal, malicious) = (set("cos_normal.csv"), set("cos_malicious.csv"));
    let cfg = CosineConfig {
        template: Template::Alpaca,
        pairs: Pairs::All,
        seed: 0,
        batch_size: 16,
    };
    let r = analyse(&model, "smollm2", &normal, &malicious, &cfg, &mut |_| {}).unwrap();
    assert_eq!(
        (
            r.curves.pair_counts.nn,
            r.curves.pair_counts.mm,
            r.curves.pair_counts.nm
        ),
        (4950, 4950, 10000)
    );
    let want = fx["entries"].as_array().unwrap();
    assert_eq!(r.curves.entries.len(), want.len());
    for (got, w) in r.curves.entries.iter().zip(want) {
        let pairs = [
            ("nn_mean", got.nn_mean),
            ("nn_std", got.nn_std),
            ("mm_mean", got.mm_mean),
            ("mm_std", got.mm_std),
            ("nm_mean", got.nm_mean),
            ("nm_std", got.nm_std),
            ("gap_code_deg", got.gap_code_deg),
            ("gap_paper_deg", got.gap_paper_deg),
        ];
        for (k, g) in pairs {
            let e = w[k].as_f64().unwrap();
            assert!(
                (g - e).abs() <= 1e-3,
                "entry {} {k}: {g} vs transformers {e}",
                got.entry
            );
        }
    }

    // Sampled pairs estimate the exact values: with R = 2000 pairs per type every mean is within
    // a few standard errors of the all-pairs mean.
    let (nv, _) = vectors(&model, &normal, &cfg, &mut |_| {}).unwrap();
    let (mv, _) = vectors(&model, &malicious, &cfg, &mut |_| {}).unwrap();
    let sampled = curves(&nv, &mv, Pairs::Sampled(2000), 7).unwrap();
    let small = curves(&nv, &mv, Pairs::Sampled(20), 7).unwrap();
    let (mut err_big, mut err_small) = (0f64, 0f64);
    for ((s, b), exact) in sampled
        .entries
        .iter()
        .zip(&small.entries)
        .zip(&r.curves.entries)
    {
        for (got, sd, want) in [
            (s.nn_mean, exact.nn_std, exact.nn_mean),
            (s.mm_mean, exact.mm_std, exact.mm_mean),
            (s.nm_mean, exact.nm_std, exact.nm_mean),
        ] {
            assert!(
                (got - want).abs() <= 5.0 * sd / (2000f64).sqrt() + 1e-9,
                "entry {}: sampled {got} vs exact {want}",
                s.entry
            );
        }
        err_big += (s.nm_mean - exact.nm_mean).abs();
        err_small += (b.nm_mean - exact.nm_mean).abs();
    }
    assert!(
        err_big < err_small,
        "more pairs, closer to the exact value ({err_big} vs {err_small})"
    );
}
