//! Teacher-forced reference scoring (the perplexity of eval's utility columns) on fixture
//! checkpoints, against transformers (tests/fixtures/<family>/expected.json): with transformers'
//! own greedy tokens as the references, every reference token is the model's top choice, and
//! the first one's log-probability equals log_softmax of transformers' last-token logits.
//! Batched, left-padded scoring equals scoring each row alone.

use crate::common::fixture;
use sl_engine::Model;
use sl_science::eval::utility::target_logprobs;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn reference_logprobs_match_transformers() {
    for family in ["llama", "qwen3", "gemma2"] {
        let dir = fixture(family);
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let model = Model::load(&dir).unwrap();
        let n = fx["input_ids"].as_array().unwrap().len();
        // Different reference lengths per row, so batches hold ragged rows.
        let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..n)
            .map(|i| {
                let mut g = ids(&fx["greedy"][i]);
                g.truncate(12 - 3 * i.min(3));
                (ids(&fx["input_ids"][i]), g)
            })
            .collect();
        let batched = target_logprobs(&model.decoder, &rows, 100_000).unwrap();
        let alone = target_logprobs(&model.decoder, &rows, 1).unwrap();
        for i in 0..n {
            assert_eq!(batched[i].len(), rows[i].1.len());
            assert!(
                batched[i].iter().all(|(_, top)| *top),
                "{family} row {i}: transformers' greedy tokens are the model's top choices"
            );
            for (a, b) in batched[i].iter().zip(&alone[i]) {
                assert!(
                    (a.0 - b.0).abs() < 1e-4,
                    "{family} row {i}: batched {} vs alone {}",
                    a.0,
                    b.0
                );
            }
            let logits: Vec<f64> = fx["logits_last"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let want = logits[rows[i].1[0] as usize] - lse;
            assert!(
                (batched[i][0].0 - want).abs() < 1e-4,
                "{family} row {i}: {} vs transformers {want}",
                batched[i][0].0
            );
        }
        // A reference token that is not greedy's choice scores lower than greedy's.
        let mut other = rows[0].clone();
        other.1 = vec![(other.1[0] + 1) % model.cfg().vocab_size as u32];
        let lp = target_logprobs(&model.decoder, &[other], 64).unwrap();
        assert!(!lp[0][0].1 && lp[0][0].0 < batched[0][0].0, "{family}");
        // Rows with no reference tokens score nothing; an empty prompt is an error.
        assert!(
            target_logprobs(&model.decoder, &[(rows[0].0.clone(), vec![])], 64).unwrap()[0]
                .is_empty()
        );
        assert!(target_logprobs(&model.decoder, &[(vec![], vec![1])], 64).is_err());
    }
}
