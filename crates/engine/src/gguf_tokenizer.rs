//! A `tokenizer.json` (and `tokenizer_config.json`) rebuilt from GGUF tokenizer metadata, the
//! way transformers' GGUF loader rebuilds it, so token ids equal transformers' on the same file.

use crate::gguf::{gguf_bool, gguf_ints, gguf_str, gguf_strings, gguf_u64};
use anyhow::{bail, Result};
use candle_core::quantized::gguf_file::Content;
use serde_json::{json, Map, Value};

/// GPT-2's byte-to-printable-character table.
fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer split regex llama.cpp's `tokenizer.ggml.pre` names (None: GPT-2's own).
fn split_regex(pre: Option<&str>) -> Option<&'static str> {
    match pre? {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

pub fn build(c: &Content, shown: &str) -> Result<(Value, Value)> {
    let model = gguf_str(c, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!(
            "{shown}: GGUF tokenizer type `{model}` is not supported yet (supported: gpt2 byte-level BPE); convert the model with its Hugging Face tokenizer.json instead"
        );
    }
    let tokens = gguf_strings(c, "tokenizer.ggml.tokens")?;
    let types = gguf_ints(c, "tokenizer.ggml.token_type")?;
    let merges = gguf_strings(c, "tokenizer.ggml.merges")?;
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|ch| alphabet.contains(&ch));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(t) { t.clone() } else { t.bytes().map(|b| table[b as usize]).collect() };
        vocab.insert(spelled, json!(i));
    }
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types.iter().chain(std::iter::repeat(&1))).enumerate() {
        // 3 = control (special), 4 = user-defined (added, not special). A control token outside
        // the byte alphabet is a llama.cpp mislabel that transformers skips too.
        let special = match ty {
            3 if in_alphabet(t) => true,
            4 => false,
            _ => continue,
        };
        added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special}));
    }
    let pre = gguf_str(c, "tokenizer.ggml.pre");
    let pre_tokenizer = match split_regex(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let token_at = |key: &str| gguf_u64(c, key).and_then(|i| tokens.get(i as usize)).cloned();
    let bos = token_at("tokenizer.ggml.bos_token_id");
    let add_bos = gguf_bool(c, "tokenizer.ggml.add_bos_token").unwrap_or(false);
    let post = match (&bos, add_bos) {
        (Some(b), true) => {
            let id = gguf_u64(c, "tokenizer.ggml.bos_token_id").unwrap_or(0);
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [id], "tokens": [b]}}})
        }
        _ => json!({"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let mut tc = Map::new();
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tc.insert("add_bos_token".into(), json!(add_bos));
    tc.insert("add_eos_token".into(), json!(gguf_bool(c, "tokenizer.ggml.add_eos_token").unwrap_or(false)));
    for (name, key) in [("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"), ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id")] {
        if let Some(t) = token_at(key) {
            tc.insert(name.into(), json!(t));
        }
    }
    if let Some(t) = gguf_str(c, "tokenizer.chat_template") {
        tc.insert("chat_template".into(), json!(t));
    }
    Ok((tokenizer, Value::Object(tc)))
}
