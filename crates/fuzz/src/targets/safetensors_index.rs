//! A sharded model directory: `model.safetensors.index.json` beside the qwen2 fixture's shards
//! (linked in unchanged); the index is mutated: weight_map entries naming missing or odd files,
//! paths out of the directory, huge metadata.

use super::{Ctx, Target};
use crate::mutate::{self, Rng};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    crate::ctx_from_env().root.join("tests/fixtures/qwen2")
}

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let p = ctx
        .root
        .join("tests/fixtures/qwen2/model.safetensors.index.json");
    Ok(vec![super::read_seed(&p)?])
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(input).ok()?;
    match rng.below(3) {
        0 => {
            let map = v.get_mut("weight_map")?.as_object_mut()?;
            let keys: Vec<String> = map.keys().cloned().collect();
            let odd = [
                json!("../model-00001-of-00007.safetensors"),
                json!("/etc/passwd"),
                json!(""),
                json!("."),
                json!(".."),
                json!("model.safetensors.index.json"),
                json!("missing.safetensors"),
                json!("model-00002-of-00007.safetensors"),
                json!("sub/model-00001-of-00007.safetensors"),
                json!("x".repeat(1 << 12)),
                json!(7),
                json!(null),
            ];
            let x = odd[rng.below(odd.len())].clone();
            if !keys.is_empty() && rng.below(4) > 0 {
                map.insert(keys[rng.below(keys.len())].clone(), x);
            } else {
                map.insert(format!("extra.{}", rng.below(1000)), x);
            }
        }
        1 => {
            let huge = match rng.below(3) {
                0 => json!({ "total_size": "x".repeat(1 << 20) }),
                1 => Value::Array(vec![json!(0); 1 << 17]),
                _ => json!({ "total_size": u64::MAX }),
            };
            v["metadata"] = huge;
        }
        _ => {
            for _ in 0..1 + rng.below(3) {
                mutate::json(rng, &mut v);
            }
        }
    }
    serde_json::to_vec(&v).ok()
}

fn run(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .expect("the worker's file lies in a directory");
    let fix = fixture();
    for e in std::fs::read_dir(&fix).with_context(|| format!("{}", fix.display()))? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::os::unix::fs::symlink(&p, dir.join(name))?;
        }
    }
    let files = sl_engine::io::weights::safetensors_files(dir)?;
    sl_engine::io::weights::load_safetensors(&files, &dir.display().to_string(), None).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "safetensors-index",
        file_name: "model.safetensors.index.json",
        seeds,
        mutate: Some(mutate),
        run,
        // The shards' tensors as f32 (about 360 KB of fixture) and the parsed index: JSON takes
        // up to about 32 times its text (`0,` becomes a 32-byte value in a growing vector).
        mem_base: 16 << 20,
        mem_factor: 64,
        max_len: 4 << 20,
    }
}
