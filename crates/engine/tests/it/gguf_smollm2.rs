//! The real SmolLM2-135M-Instruct GGUF (../shared/models) against transformers loading the same
//! file with `gguf_file=` (fixture from tools/fixtures/make_gguf_fixtures.py): token ids, all 31
//! hidden-state entries at the last token within 1e-3, top logits, greedy 16-token responses.

use crate::common::{root, shared, skip_without_shared};
use serde_json::Value;
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::{Model, PromptRecord, Template};

#[test]
fn smollm2_gguf_equals_transformers() {
    if skip_without_shared(&["models/SmolLM2-135M-Instruct.Q4_1.gguf"]) {
        return;
    }
    let root = root();
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/gguf/smollm2_expected.json")).unwrap(),
    )
    .unwrap();
    let m = Model::load(&shared().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    assert_eq!(m.cfg().num_layers, 30);
    assert_eq!(m.cfg().hidden_size, 576);
    assert_eq!((m.cfg().num_heads, m.cfg().num_kv_heads), (9, 3));
    let results = fx["results"].as_array().unwrap();
    let records: Vec<PromptRecord> = results
        .iter()
        .map(|r| PromptRecord::new(r["instruction"].as_str().unwrap()))
        .collect();
    let prompts = m.prompts(&records, Template::Alpaca).unwrap();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let as_ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (p, r) in prompts.iter().zip(results) {
        assert_eq!(p.text, r["prompt"].as_str().unwrap());
        assert_eq!(
            p.ids,
            as_ids(&r["input_ids"]),
            "token ids of {:?}",
            r["instruction"]
        );
    }
    let hidden = sl_engine::infer::extract::hidden_last(&m.decoder, &ids, 8, &mut |_| {}).unwrap();
    let mut worst = 0f32;
    for (h, r) in hidden.iter().zip(results) {
        let want = r["last_token_hidden_states"].as_array().unwrap();
        let got = h.to_vec2::<f32>().unwrap();
        assert_eq!(got.len(), 31);
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            for (a, b) in g.iter().zip(w.as_array().unwrap()) {
                let b = b.as_f64().unwrap() as f32;
                let err = (a - b).abs() / b.abs().max(1.0);
                worst = worst.max(err);
                assert!(err <= 1e-3, "{:?} entry {k}: {a} vs {b}", r["instruction"]);
            }
        }
    }
    eprintln!("largest relative hidden-state error: {worst:e}");
    let opts = GenerateOptions {
        max_new_tokens: 16,
        batch_size: 8,
        ..Default::default()
    };
    let outs = greedy(&m.decoder, &ids, &m.eos_token_ids, &opts, &mut |_| {}).unwrap();
    for (o, r) in outs.iter().zip(results) {
        assert_eq!(
            o,
            &as_ids(&r["greedy"]["ids"]),
            "greedy tokens of {:?}",
            r["instruction"]
        );
        assert_eq!(
            m.tokenizer.decode(o, true).unwrap(),
            r["greedy"]["text_skip_special"].as_str().unwrap()
        );
    }
}
