//! `logits`: the next-token distribution after each prompt (full vocabulary, log-softmax) and
//! greedy continuations, in a form a peer implementation (llama.cpp, bench/peer_llamacpp.py) can
//! be compared against token id for token id.

use crate::progress::Progress;
use crate::PromptArgs;
use anyhow::{bail, Context, Result};
use serde_json::json;
use sl_engine::infer::generate::{
    argmax, batch_cache, greedy, left_pad, shared_head_kv, shared_prefix_len, GenerateOptions,
};
use sl_engine::io::atomic::{write_atomic, AtomicFile};
use sl_engine::model::{Decoder, Logits};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct LogitsArgs {
    /// Hugging Face directory, .gguf file or catalog name
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub prompts: PromptArgs,
    /// Output .json (ids, top-5, greedy tokens); the log-probabilities go beside it as a .npy
    /// file of the same stem, [prompts, vocab] little-endian f32
    #[arg(long)]
    pub out: PathBuf,
    /// Also generate N greedy tokens per prompt (EOS does not stop them, so lengths compare)
    #[arg(long, default_value_t = 0)]
    pub greedy: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub load: crate::LoadArgs,
}

pub fn run(args: &LogitsArgs) -> Result<()> {
    if args.out.extension().and_then(|e| e.to_str()) != Some("json") {
        bail!("--out {}: expected a .json file name", args.out.display());
    }
    let npy = args.out.with_extension("npy");
    let m = crate::datasets::load_model(&args.model)?;
    let (prompts, template) = crate::commands::load_prompts(&m, &args.prompts)?;
    if prompts.is_empty() {
        bail!("--prompts {}: no prompts", args.prompts.prompts);
    }
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let prompt_tokens: usize = ids.iter().map(|i| i.len()).sum();

    let bar = Progress::new(ids.len(), "next-token logits");
    let t0 = Instant::now();
    let rows = last_logits(&m.decoder, &ids, args.batch_size, &mut |n| bar.inc(n))?;
    let logits_seconds = t0.elapsed().as_secs_f64();
    bar.finish(ids.len(), prompt_tokens, "logits");
    let vocab = rows[0].len();
    let logprobs: Vec<Vec<f32>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| log_softmax(r).with_context(|| format!("prompt {i}")))
        .collect::<Result<_>>()?;

    let (continuations, greedy_seconds) = if args.greedy > 0 {
        let opts = GenerateOptions {
            max_new_tokens: args.greedy,
            batch_size: args.batch_size,
            ignore_eos: true,
            no_cache: false,
            first_mass_of: vec![],
        };
        let bar = Progress::new(ids.len(), "greedy");
        let t0 = Instant::now();
        let outs = greedy(&m.decoder, &ids, &m.eos_token_ids, &opts, &mut |n| {
            bar.inc(n)
        })?;
        let secs = t0.elapsed().as_secs_f64();
        bar.finish(ids.len(), ids.len() * args.greedy, "greedy (new tokens)");
        (Some(outs), Some(secs))
    } else {
        (None, None)
    };

    write_npy(&npy, &logprobs)?;
    let items: Vec<serde_json::Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut item = json!({
                "prompt": p.text,
                "input_ids": p.ids,
                "top5": top_k(&logprobs[i], 5),
            });
            if let Some(c) = &continuations {
                item["greedy"] = json!(c[i]);
            }
            item
        })
        .collect();
    let doc = json!({
        "implementation": "safety-layers",
        "model": args.model.display().to_string(),
        "storage_dtype": m.source_dtype.as_str(),
        "precision": sl_science::schema::Precision::of(&m),
        "template": template.name(),
        "vocab_size": vocab,
        // Relative to this file, so the pair can be moved together.
        "logprobs": npy.file_name().map(|n| n.to_string_lossy().to_string()),
        "logprobs_shape": [prompts.len(), vocab],
        "greedy_tokens": args.greedy,
        "timings": {
            "prompt_tokens": prompt_tokens,
            "logits_seconds": logits_seconds,
            "greedy_seconds": greedy_seconds,
            "batch_size": args.batch_size,
        },
        "items": items,
    });
    write_atomic(&args.out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    eprintln!("wrote {} and {}", args.out.display(), npy.display());
    Ok(())
}

/// The logits after each prompt's last token, batched as the other commands batch (longest
/// first, left-padded, the shared template head computed once), in prompt order.
fn last_logits(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let shared = shared_prefix_len(prompts);
    let head = shared_head_kv(dec, prompts, shared)?;
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| &prompts[i][shared..]).collect();
        let (ids, pads) = left_pad(&rows, &dec.device)?;
        let mut cache = batch_cache(dec, head.as_ref(), shared);
        cache.append = false; // no next step follows
        let logits = dec.logits(&ids, &pads, Some(&mut cache), Logits::Last)?;
        for (row, &i) in logits.squeeze(1)?.to_vec2::<f32>()?.into_iter().zip(chunk) {
            out[i] = row;
        }
        progress(chunk.len());
    }
    Ok(out)
}

/// log-softmax with the normaliser summed in f64, so rows of 100k+ entries stay exact to f32.
fn log_softmax(logits: &[f32]) -> Result<Vec<f32>> {
    if let Some(j) = logits.iter().position(|x| !x.is_finite()) {
        bail!("logit {j} is {} (NaN or infinite)", logits[j]);
    }
    let max = logits[argmax(logits) as usize] as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    Ok(logits.iter().map(|&x| (x as f64 - lse) as f32).collect())
}

/// The k most likely ids with their log-probabilities, most likely first (lower id on ties).
fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter()
        .take(k)
        .map(|i| (i, logprobs[i as usize]))
        .collect()
}

/// A `[rows, cols]` little-endian f32 array in NumPy's .npy format, version 1.0: magic, header
/// length, a Python-literal header padded with spaces to a multiple of 64 bytes (as NumPy pads),
/// then the raw data in C order.
fn write_npy(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let cols = rows.first().map_or(0, |r| r.len());
    if let Some(i) = rows.iter().position(|r| r.len() != cols) {
        bail!("row {i} has {} entries, row 0 has {cols}", rows[i].len());
    }
    let mut f = AtomicFile::create(path)?;
    let w = f.writer();
    w.write_all(&npy_header(&[rows.len(), cols]))?;
    for r in rows {
        let bytes: Vec<u8> = r.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    f.commit()
}

fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // A one-element tuple needs its trailing comma in Python syntax.
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + dict + '\n'
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let h = npy_header(&[3, 49152]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([h[8], h[9]]) as usize;
        assert_eq!(10 + len, h.len());
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 49152), }"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn log_softmax_normalises_and_keeps_order() {
        let lp = log_softmax(&[1000.0, 999.0, -5.0, 0.0]).unwrap();
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(
            top_k(&lp, 2).iter().map(|t| t.0).collect::<Vec<_>>(),
            [0, 1]
        );
        assert!(log_softmax(&[0.0, f32::NAN]).is_err());
    }
}
