//! A llama-architecture GGUF with a SentencePiece-style vocabulary (tokenizer.ggml.model =
//! llama), written like llama.cpp writes one (tools/fixtures/make_gguf_sp_fixture.py): token ids,
//! decoding, all hidden states and greedy tokens equal transformers' on the same file.

use crate::common::fixture;
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::Model;

#[test]
fn sentencepiece_gguf_equals_transformers() {
    let dir = fixture("gguf");
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tiny_llama_sp_expected.json")).unwrap(),
    )
    .unwrap();
    let m = Model::load(&dir.join("tiny_llama_sp.gguf")).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (i, t) in fx["texts"].as_array().unwrap().iter().enumerate() {
        let t = t.as_str().unwrap();
        let got = m.tokenizer.encode(t, true).unwrap();
        assert_eq!(got, ids(&fx["ids"][i]), "ids of {t:?}");
        assert_eq!(
            m.tokenizer.encode(t, false).unwrap(),
            ids(&fx["ids_without_special"][i]),
            "ids without special tokens of {t:?}"
        );
        assert_eq!(
            m.tokenizer.decode(&got, true).unwrap(),
            fx["decoded"][i].as_str().unwrap(),
            "decode of {t:?}"
        );
    }
    let prompts: Vec<Vec<u32>> = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| m.tokenizer.encode(p.as_str().unwrap(), true).unwrap())
        .collect();
    let hidden =
        sl_engine::infer::extract::hidden_last(&m.decoder, &prompts, 4, &mut |_| {}).unwrap();
    for (p, h) in hidden.iter().enumerate() {
        assert_eq!(prompts[p], ids(&fx["input_ids"][p]));
        for (k, row) in h.to_vec2::<f32>().unwrap().iter().enumerate() {
            for (a, b) in row.iter().zip(fx["hidden_last"][p][k].as_array().unwrap()) {
                let b = b.as_f64().unwrap() as f32;
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "prompt {p} entry {k}: {a} vs {b}"
                );
            }
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: 8,
        batch_size: 2,
        ..Default::default()
    };
    let g = greedy(&m.decoder, &prompts, &m.eos_token_ids, &opts, &mut |_| {}).unwrap();
    for (p, want) in g.iter().zip(fx["greedy"].as_array().unwrap()) {
        assert_eq!(p, &ids(want));
    }
}

/// Gemma-3 and Phi-3 SentencePiece vocabularies (tools/fixtures/make_gguf_vocab_fixtures.py):
/// token ids with and without special tokens, and decoding, equal transformers' on the same
/// vocabulary-only files. Gemma's space runs are stored as spaces and its scores are out of
/// merge order; Phi-3 takes its prefix space from a normalizer.
#[test]
fn gemma_and_phi3_vocabularies_equal_transformers() {
    let dir = fixture("gguf");
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tiny_vocab_expected.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let texts = fx["texts"].as_array().unwrap();
    for (file, want) in fx["files"].as_object().unwrap() {
        let path = dir.join(file);
        let (tj, tc) = sl_engine::io::gguf_vocab::from_file(&path).unwrap();
        let tok = sl_engine::Tokenizer::from_json(&tj, &tc, file).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let t = t.as_str().unwrap();
            let got = tok.encode(t, true).unwrap();
            assert_eq!(got, ids(&want["ids"][i]), "{file}: ids of {t:?}");
            assert_eq!(
                tok.encode(t, false).unwrap(),
                ids(&want["ids_without_special"][i]),
                "{file}: ids without special tokens of {t:?}"
            );
            assert_eq!(
                tok.decode(&got, true).unwrap(),
                want["decoded"][i].as_str().unwrap(),
                "{file}: decode of {t:?}"
            );
        }
    }
}
