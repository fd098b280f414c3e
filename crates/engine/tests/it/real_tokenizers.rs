//! Real tokenizers and chat templates (../shared/tokenizers/{llama3,qwen3,gemma3}) against what
//! Python `tokenizers` and transformers' apply_chat_template give (fixtures from
//! tools/fixtures/make_tokenizer_fixtures.py).

use crate::common::{root, shared, skip_without_shared};
use serde_json::Value;
use sl_engine::text::chat::Message;
use sl_engine::text::tokenizer::Tokenizer;

fn check(name: &str) {
    if skip_without_shared(&["tokenizers"]) {
        return;
    }
    let root = root();
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(format!("tests/fixtures/tokenizers/{name}.json")))
            .unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&shared().join("tokenizers").join(name)).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (i, text) in fx["texts"].as_array().unwrap().iter().enumerate() {
        let text = text.as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&fx["ids_with_special"][i]),
            "{name}: ids of {text:?}"
        );
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(
            plain,
            ids(&fx["ids_without_special"][i]),
            "{name}: ids without special tokens of {text:?}"
        );
        let with = ids(&fx["ids_with_special"][i]);
        assert_eq!(
            tok.decode(&with, false).unwrap(),
            fx["decoded"][i].as_str().unwrap(),
            "{name}: decode of {text:?}"
        );
        let d = fx["decoded_without_special"][i].as_str().unwrap();
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            d,
            "{name}: decode of the ids without special tokens of {text:?}"
        );
    }
    let mut cases = 0;
    for case in fx["chat"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let extra = case
            .get("extra_template_vars")
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default();
        let got = tok.apply_chat_template_with(&msgs, agp, &extra);
        if case["raises"].as_bool().unwrap_or(false) {
            assert!(
                got.is_err(),
                "{name} {}: the template raises in transformers",
                case["name"]
            );
        } else {
            let got = got.unwrap_or_else(|e| panic!("{name} {}: {e:#}", case["name"]));
            assert_eq!(
                got,
                case["rendered"].as_str().unwrap(),
                "{name} {}: rendered chat",
                case["name"]
            );
            if let Some(want) = case.get("rendered_ids").filter(|v| v.is_array()) {
                assert_eq!(
                    tok.encode(&got, false).unwrap(),
                    ids(want),
                    "{name} {}: ids of the rendered chat",
                    case["name"]
                );
            }
        }
        cases += 1;
    }
    assert!(
        cases >= 8,
        "{name}: 1- and 3-turn, with/without system, with/without generation prompt"
    );
}

#[test]
fn llama3() {
    check("llama3");
}

#[test]
fn qwen3() {
    check("qwen3");
}

#[test]
fn gemma3() {
    check("gemma3");
}
