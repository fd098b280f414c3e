//! tokenizer.json (with a tokenizer_config.json beside it) as `Tokenizer::from_dir` loads it,
//! then one round of encode and decode of a fixed text. Seeds: the fixtures' small tokenizers
//! and the real Llama 3, Qwen3 and Gemma 3 ones cut to their first tokens, so that 100,000 runs
//! fit in minutes.

use super::{read_seed, Ctx, Target};
use crate::mutate::{self, Rng};
use anyhow::{Context, Result};
use serde_json::Value;
use sl_engine::text::tokenizer::Tokenizer;
use std::collections::HashSet;
use std::path::Path;

/// Tokens kept of a real vocabulary.
const KEEP: u64 = 2000;

const CONFIG: &str = include_str!("../../../../tests/fixtures/llama3/tokenizer_config.json");

/// A real tokenizer.json cut to its first `KEEP` tokens and the merges among them.
fn shrink(mut v: Value) -> Value {
    let Some(model) = v.get_mut("model") else {
        return v;
    };
    let mut kept = HashSet::new();
    match model.get_mut("vocab") {
        Some(Value::Object(m)) => {
            m.retain(|_, id| id.as_u64().is_some_and(|i| i < KEEP));
            kept.extend(m.keys().cloned());
        }
        Some(Value::Array(a)) => a.truncate(KEEP as usize),
        _ => {}
    }
    if let Some(Value::Array(merges)) = model.get_mut("merges") {
        merges.retain(|m| {
            let (a, b) = match m {
                Value::String(s) => match s.split_once(' ') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => return false,
                },
                Value::Array(p) if p.len() == 2 => (
                    p[0].as_str().unwrap_or("").to_string(),
                    p[1].as_str().unwrap_or("").to_string(),
                ),
                _ => return false,
            };
            kept.contains(&a) && kept.contains(&b) && kept.contains(&format!("{a}{b}"))
        });
    }
    v
}

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let mut out = super::fixture_files(ctx, "tokenizer.json")?;
    out.sort();
    out.dedup();
    for name in ["llama3", "qwen3", "gemma3"] {
        let p = ctx
            .shared
            .join("tokenizers")
            .join(name)
            .join("tokenizer.json");
        if p.is_file() {
            let v: Value = serde_json::from_slice(&read_seed(&p)?)
                .with_context(|| format!("fuzz seed {}", p.display()))?;
            out.push(serde_json::to_vec(&shrink(v))?);
        }
    }
    Ok(out)
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(input).ok()?;
    for _ in 0..1 + rng.below(3) {
        mutate::json(rng, &mut v);
    }
    serde_json::to_vec(&v).ok()
}

fn run(path: &Path) -> Result<()> {
    let dir = path.parent().context("no directory")?;
    let tc = dir.join("tokenizer_config.json");
    std::fs::write(&tc, CONFIG).with_context(|| format!("cannot write {}", tc.display()))?;
    let tok = Tokenizer::from_dir(dir)?;
    let ids = tok.encode(
        "Hello, world! 123 héllo\n\t<|begin_of_text|> 日本語 🙂",
        true,
    )?;
    tok.decode(&ids, false)?;
    tok.decode(&ids, true)?;
    Ok(())
}

pub fn target() -> Target {
    Target {
        name: "tokenizer",
        file_name: "tokenizer.json",
        seeds,
        mutate: Some(mutate),
        run,
        mem_base: 64 << 20,
        mem_factor: 64,
        max_len: 1 << 20,
    }
}
