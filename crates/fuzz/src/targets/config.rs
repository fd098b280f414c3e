//! `config.json` of every family: the fixtures' configs, with fields removed, renamed or set to
//! extreme values.

use super::{read_seed, Ctx, Target};
use crate::mutate::{self, Rng};
use anyhow::Result;
use std::path::Path;

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let dir = ctx.root.join("tests/fixtures");
    let mut fams: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    fams.sort();
    for f in fams {
        let p = f.join("config.json");
        if p.is_file() {
            out.push(read_seed(&p)?);
        }
    }
    Ok(out)
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(input).ok()?;
    for _ in 0..1 + rng.below(3) {
        mutate::json(rng, &mut v);
    }
    serde_json::to_vec(&v).ok()
}

fn run(path: &Path) -> Result<()> {
    sl_engine::ModelConfig::from_file(path).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "config",
        file_name: "config.json",
        seeds,
        mutate: Some(mutate),
        run,
        mem_base: 16 << 20,
        mem_factor: 64,
        max_len: 1 << 16,
    }
}
