//! Training checkpoints that `finetune --resume` reads (`checkpoint::read_dir`): `state.json`,
//! `params.safetensors` and `optimizer.safetensors` of one `step-NNNNNNNN` directory.
//!
//! An input is the three files in one bundle (each a u32 length and its bytes; a length past
//! the end leaves that file and the next ones out); the run unpacks it into the directory the
//! reader reads. The seed is a real checkpoint of a tiny fine-tune of the qwen2 fixture
//! (crates/fuzz/seeds/checkpoint, written by `safety-layers finetune --save-every 1`).

use super::{read_seed, Ctx, Target};
use crate::mutate::{self, Rng};
use anyhow::{Context, Result};
use std::path::Path;

const FILES: [&str; 3] = ["state.json", "params.safetensors", "optimizer.safetensors"];

fn bundle(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(&(p.len() as u32).to_le_bytes());
        v.extend_from_slice(p);
    }
    v
}

fn unbundle(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < FILES.len() && b.len() >= 4 {
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let Some(part) = b.get(4..4 + n) else { break };
        out.push(part.to_vec());
        b = &b[4 + n..];
    }
    out
}

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let dir = ctx.root.join("crates/fuzz/seeds/checkpoint/step-00000002");
    let parts = FILES
        .iter()
        .map(|f| read_seed(&dir.join(f)))
        .collect::<Result<Vec<_>>>()?;
    Ok(vec![bundle(&parts)])
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut parts = unbundle(input);
    if parts.is_empty() {
        return None;
    }
    let i = rng.below(parts.len());
    if i == 0 {
        let mut v: serde_json::Value = serde_json::from_slice(&parts[0]).ok()?;
        for _ in 0..1 + rng.below(3) {
            mutate::json(rng, &mut v);
        }
        parts[0] = serde_json::to_vec(&v).ok()?;
    } else if rng.below(8) == 0 {
        parts.truncate(i);
    } else {
        parts[i] = super::safetensors::mutate_file(rng, &parts[i])?;
    }
    Some(bundle(&parts))
}

fn run(path: &Path) -> Result<()> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    std::fs::remove_file(path)?;
    std::fs::create_dir(path)?;
    for (name, part) in FILES.iter().zip(unbundle(&b)) {
        std::fs::write(path.join(name), part)?;
    }
    drop(b);
    sl_science::finetune::checkpoint::read_dir(path).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "checkpoint",
        file_name: "step-00000002",
        seeds,
        mutate: Some(mutate),
        run,
        // The bundle and its unpacked parts, then candle's reader: each safetensors file read
        // whole and its tensors copied out (about twice its bytes), and `state.json` parsed
        // (JSON takes up to about 32 times its text).
        mem_base: 16 << 20,
        mem_factor: 40,
        max_len: 1 << 21,
    }
}
