//! Batched greedy generation with a KV cache. Prompts are sorted by length and left-padded, each
//! sequence stops on any EOS id, and finished rows leave the batch so they cost nothing more.

use crate::hooks::Capture;
use crate::model::{Decoder, KvCache, Logits};
use anyhow::Result;
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// Always generate `max_new_tokens` (benchmarks, tests).
    pub ignore_eos: bool,
    /// Generate without the cache, re-running the whole sequence each step (for tests).
    pub no_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 16, batch_size: 16, ignore_eos: false, no_cache: false }
    }
}

/// Index of the largest value; the first one on ties, as torch.argmax.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Left-pads rows into one `[B, T]` tensor; returns it with the pad count of each row.
pub fn left_pad(rows: &[&[u32]], device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(rows.len() * t);
    let mut pads = Vec::with_capacity(rows.len());
    for r in rows {
        let pad = t - r.len();
        pads.push(pad);
        flat.extend(std::iter::repeat_n(0u32, pad));
        flat.extend_from_slice(r);
    }
    Ok((Tensor::from_vec(flat, (rows.len(), t), device)?, pads))
}

/// Greedy continuations of `prompts` (token ids). The output of each prompt holds the new
/// tokens, including the EOS token that stopped it. `progress` is told how many prompts finished.
pub fn greedy(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    eos: &[u32],
    opts: &GenerateOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut out = vec![Vec::new(); prompts.len()];
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let results = greedy_batch(dec, &rows, eos, opts)?;
        for (&i, r) in chunk.iter().zip(results) {
            out[i] = r;
        }
        progress(chunk.len());
    }
    Ok(out)
}

fn greedy_batch(dec: &Decoder, rows: &[&[u32]], eos: &[u32], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    if opts.max_new_tokens == 0 {
        return Ok(outputs);
    }
    if opts.no_cache {
        return greedy_batch_uncached(dec, rows, eos, opts);
    }
    let (ids, mut pads) = left_pad(rows, &dec.device)?;
    let mut cache = KvCache::new(dec.num_layers());
    // Rows of the current batch tensor, as indices into `rows`.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    let mut input = ids;
    for step in 0..opts.max_new_tokens {
        let (logits, _) = dec.forward(&input, &pads, Some(&mut cache), &Capture::none(), Logits::Last)?;
        let logits = logits.expect("logits requested").squeeze(1)?.to_vec2::<f32>()?;
        let mut keep = Vec::new();
        let mut next = Vec::new();
        for (pos, &row) in active.iter().enumerate() {
            let tok = argmax(&logits[pos]);
            outputs[row].push(tok);
            if opts.ignore_eos || !eos.contains(&tok) {
                keep.push(pos);
                next.push(tok);
            }
        }
        if keep.is_empty() || step + 1 == opts.max_new_tokens {
            break;
        }
        if keep.len() != active.len() {
            let idx = Tensor::from_vec(keep.iter().map(|&p| p as u32).collect::<Vec<_>>(), keep.len(), &dec.device)?;
            cache.select_rows(&idx)?;
            pads = keep.iter().map(|&p| pads[p]).collect();
            active = keep.iter().map(|&p| active[p]).collect();
        }
        input = Tensor::from_vec(next, (active.len(), 1), &dec.device)?;
    }
    Ok(outputs)
}

/// Reference path: every step re-runs the full sequence.
fn greedy_batch_uncached(dec: &Decoder, rows: &[&[u32]], eos: &[u32], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    let mut seqs: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    let mut done = vec![false; rows.len()];
    for _ in 0..opts.max_new_tokens {
        let active: Vec<usize> = (0..rows.len()).filter(|&i| !done[i]).collect();
        if active.is_empty() {
            break;
        }
        let batch: Vec<&[u32]> = active.iter().map(|&i| seqs[i].as_slice()).collect();
        let (ids, pads) = left_pad(&batch, &dec.device)?;
        let (logits, _) = dec.forward(&ids, &pads, None, &Capture::none(), Logits::Last)?;
        let logits = logits.expect("logits requested").squeeze(1)?.to_vec2::<f32>()?;
        for (pos, &i) in active.iter().enumerate() {
            let tok = argmax(&logits[pos]);
            outputs[i].push(tok);
            seqs[i].push(tok);
            if !opts.ignore_eos && eos.contains(&tok) {
                done[i] = true;
            }
        }
    }
    Ok(outputs)
}
