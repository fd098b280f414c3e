//! Batched greedy generation with a KV cache. Prompts are sorted by length and left-padded, each
//! sequence stops on any EOS id, and finished rows leave the batch so they cost nothing more.

use crate::model::hooks::{ActivationCache, HookSpec};
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
    /// Tokens whose summed probability at the first new position each `Generation` reports as
    /// `first_mass` (the probe judge's score, read off the generation's own first step rather
    /// than a second forward pass over every prompt). Empty: none reported.
    pub first_mass_of: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 16,
            batch_size: 16,
            ignore_eos: false,
            no_cache: false,
            first_mass_of: vec![],
        }
    }
}

/// The softmax probability `logits` give to the tokens `ids` together (summed in f64).
pub fn softmax_mass(logits: &[f32], ids: &[u32]) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    ids.iter()
        .map(|&i| (logits[i as usize] as f64 - max).exp() / z)
        .sum()
}

/// `first_mass` of a row's first-step logits under `opts`.
fn first_mass(opts: &GenerateOptions, logits: &[f32]) -> Option<f64> {
    (!opts.first_mass_of.is_empty()).then(|| softmax_mass(logits, &opts.first_mass_of))
}

/// Each row's greedy token and (when `with_mass`) its `first_mass`, from `logits: [B, V]`.
/// A contiguous CPU tensor is read in place with the rows split over the pool (at 128 rows
/// the lm_head's output is 25 MB a step: copying it into one vector per row, then scanning the
/// rows on one thread, was a twentieth of a decode step); anything else is copied out first.
fn pick_rows(
    logits: &Tensor,
    opts: &GenerateOptions,
    with_mass: bool,
) -> Result<Vec<(u32, Option<f64>)>> {
    use rayon::prelude::*;
    let (_, v) = logits.dims2()?;
    let pick = |row: &[f32]| {
        let mass = if with_mass {
            first_mass(opts, row)
        } else {
            None
        };
        (argmax(row), mass)
    };
    let picked = crate::kernels::matmul_small::with_f32(logits, |all| {
        all.par_chunks(v.max(1)).map(pick).collect::<Vec<_>>()
    });
    Ok(match picked {
        Some(p) => p,
        None => logits.to_vec2::<f32>()?.iter().map(|r| pick(r)).collect(),
    })
}

/// Index of the largest value; the first one on ties, as torch.argmax. A NaN is never the
/// largest (a leading NaN is kept, as no value exceeds it): the loop's rule, which
/// `argmax_scalar` states and the tests hold this to.
pub fn argmax(v: &[f32]) -> u32 {
    // The maximum in 16 lanes (`x > a` then `x` else `a`, which vectorises), then its first
    // index: a scan that compilers do not vectorise, over the lm_head's 49k-256k logits per
    // row and step, was a twentieth of a 128-row decode step. A NaN anywhere takes the loop.
    const L: usize = 16;
    let chunks = v.chunks_exact(L);
    let tail = chunks.remainder();
    let mut acc = [f32::NEG_INFINITY; L];
    let mut nan = [false; L];
    for c in chunks {
        for l in 0..L {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
            nan[l] |= c[l].is_nan();
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &x in acc.iter().chain(tail) {
        max = if x > max { x } else { max };
    }
    if nan.iter().any(|&n| n) || tail.iter().any(|x| x.is_nan()) {
        return argmax_scalar(v);
    }
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// `argmax` one value at a time: the rule it follows.
fn argmax_scalar(v: &[f32]) -> u32 {
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

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The caller's stop predicate (e.g. a refusal judge whose verdict can no longer change).
    Caller,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, including the EOS token that stopped the sequence.
    pub ids: Vec<u32>,
    pub stop: StopReason,
    /// The probability of `GenerateOptions::first_mass_of` at the first new position (None when
    /// that is empty or nothing was generated).
    pub first_mass: Option<f64>,
}

/// Asked after every new token with the prompt's index and its tokens so far: true stops it.
pub type StopFn<'a> = &'a (dyn Fn(usize, &[u32]) -> bool + Sync);

/// Tokens every prompt starts with (a chat or Alpaca template's head), leaving each prompt at
/// least one token of its own; 0 for fewer than two prompts. Those positions are computed once
/// for all prompts: a row's keys/values there do not depend on the rest of the row.
pub fn shared_prefix_len(prompts: &[Vec<u32>]) -> usize {
    let (Some(first), true) = (prompts.first(), prompts.len() > 1) else {
        return 0;
    };
    let mut n = first.len().saturating_sub(1);
    for p in &prompts[1..] {
        n = n
            .min(p.iter().zip(first).take_while(|(a, b)| a == b).count())
            .min(p.len().saturating_sub(1));
    }
    n
}

/// The shared prompt head (`x`: `[1, T, H]` entering `layers.start`) run once through `layers`:
/// its keys/values and the residual stream leaving the last of them.
fn run_head(dec: &Decoder, x: Tensor, layers: std::ops::Range<usize>) -> Result<(KvCache, Tensor)> {
    let ctx = dec.step_ctx(&[0], 0, x.dim(1)?)?;
    let mut kv = KvCache::new(dec.num_layers());
    let x = dec.run_layers(
        x,
        layers,
        &ctx,
        Some(&mut kv),
        &HookSpec::none(),
        &mut ActivationCache::default(),
    )?;
    Ok((kv, x))
}

/// The prompts' first `shared` tokens run through layers `0..layers_end` (None when 0).
fn shared_head(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    shared: usize,
    layers_end: usize,
) -> Result<Option<(KvCache, Tensor)>> {
    if shared == 0 {
        return Ok(None);
    }
    let ids = Tensor::from_vec(prompts[0][..shared].to_vec(), (1, shared), &dec.device)?;
    Ok(Some(run_head(dec, dec.embed(&ids)?, 0..layers_end)?))
}

/// The keys/values of every layer for the prompts' first `shared` tokens, or None when 0.
pub fn shared_head_kv(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    shared: usize,
) -> Result<Option<KvCache>> {
    Ok(shared_head(dec, prompts, shared, dec.num_layers())?.map(|h| h.0))
}

/// A fresh cache for a batch: the shared head's keys/values (one row, read by every row), or
/// empty.
pub fn batch_cache(dec: &Decoder, head: Option<&KvCache>, shared: usize) -> KvCache {
    match head {
        Some(h) => KvCache::from_shared(h, shared),
        None => KvCache::new(dec.num_layers()),
    }
}

/// The residual stream entering `start_layer` and the keys/values of the layers below it, for
/// every prompt, batched as generation will batch them. Scaling layers >= `start_layer` changes
/// none of it, so one prefix serves every range with that lower bound. The prompts' shared head
/// is kept once (its residual stream entering `start_layer`) and run through the upper layers
/// once per call instead of once per row.
pub struct PrefixCache {
    pub start_layer: usize,
    batches: Vec<PrefixBatch>,
    num_prompts: usize,
    head_x: Option<Tensor>,
}

struct PrefixBatch {
    idx: Vec<usize>,
    pads: Vec<usize>,
    x: Tensor,
    kv: KvCache,
}

/// Prompt indices sorted longest first, in batches.
fn batches(prompts: &[Vec<u32>], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}

impl PrefixCache {
    pub fn build(
        dec: &Decoder,
        prompts: &[Vec<u32>],
        batch_size: usize,
        start_layer: usize,
    ) -> Result<PrefixCache> {
        let shared = shared_prefix_len(prompts);
        let head = shared_head(dec, prompts, shared, start_layer)?;
        let mut out = Vec::new();
        for idx in batches(prompts, batch_size) {
            let rows: Vec<&[u32]> = idx.iter().map(|&i| &prompts[i][shared..]).collect();
            let (ids, pads) = left_pad(&rows, &dec.device)?;
            let t = ids.dim(1)?;
            let ctx = dec.step_ctx_shared(&pads, shared, shared, t)?;
            let mut kv = batch_cache(dec, head.as_ref().map(|h| &h.0), shared);
            let x = crate::kernels::on_workers(|| {
                dec.run_layers(
                    dec.embed(&ids)?,
                    0..start_layer,
                    &ctx,
                    Some(&mut kv),
                    &HookSpec::none(),
                    &mut ActivationCache::default(),
                )
            })?;
            // Kept for every run and never appended to: without the decode buffers' room.
            kv.compact()?;
            out.push(PrefixBatch { idx, pads, x, kv });
        }
        Ok(PrefixCache {
            start_layer,
            batches: out,
            num_prompts: prompts.len(),
            head_x: head.map(|h| h.1),
        })
    }

    /// Each batch: prompt indices, pad counts, residual stream entering `start_layer`, and the
    /// keys/values of the layers below it.
    pub fn batches(&self) -> impl Iterator<Item = (&[usize], &[usize], &Tensor, &KvCache)> {
        self.batches
            .iter()
            .map(|b| (b.idx.as_slice(), b.pads.as_slice(), &b.x, &b.kv))
    }
}

/// Greedy continuations of `prompts` (token ids). `progress` is told how many prompts finished.
///
/// ```no_run
/// use sl_engine::{greedy, GenerateOptions, Model, PromptRecord, Template};
///
/// # fn main() -> anyhow::Result<()> {
/// let model = Model::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
/// let prompts = model.prompts(&[PromptRecord::new("Write a haiku.")], Template::Chat)?;
/// let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
/// let opts = GenerateOptions { max_new_tokens: 40, ..Default::default() };
/// let out = greedy(&model.decoder, &ids, &model.eos_token_ids, &opts, &mut |_| {})?;
/// println!("{}", model.tokenizer.decode(&out[0], true)?);
/// # Ok(())
/// # }
/// ```
pub fn greedy(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    eos: &[u32],
    opts: &GenerateOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    Ok(greedy_with(dec, prompts, eos, opts, None, progress)?
        .into_iter()
        .map(|g| g.ids)
        .collect())
}

/// As `greedy`, with a stop predicate, returning why each sequence stopped.
pub fn greedy_with(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    eos: &[u32],
    opts: &GenerateOptions,
    stop: Option<StopFn<'_>>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Generation>> {
    let mut out = vec![
        Generation {
            ids: vec![],
            stop: StopReason::MaxTokens,
            first_mass: None,
        };
        prompts.len()
    ];
    let shared = if opts.no_cache {
        0
    } else {
        shared_prefix_len(prompts)
    };
    let head = shared_head_kv(dec, prompts, shared)?;
    for idx in batches(prompts, opts.batch_size) {
        let results = if opts.no_cache {
            let rows: Vec<&[u32]> = idx.iter().map(|&i| prompts[i].as_slice()).collect();
            greedy_batch_uncached(dec, &rows, eos, opts)?
        } else {
            let rows: Vec<&[u32]> = idx.iter().map(|&i| &prompts[i][shared..]).collect();
            let (ids, pads) = left_pad(&rows, &dec.device)?;
            let cache = batch_cache(dec, head.as_ref(), shared);
            crate::kernels::on_workers(|| {
                decode_batch(dec, First::Ids(ids), &idx, pads, cache, eos, opts, stop)
            })?
        };
        for (&i, r) in idx.iter().zip(results) {
            out[i] = r;
        }
        progress(idx.len());
    }
    Ok(out)
}

/// Greedy continuations that start from a prefix cache (the current weights of layers below
/// `prefix.start_layer` must be the ones it was built with).
pub fn greedy_from_prefix(
    dec: &Decoder,
    prefix: &PrefixCache,
    eos: &[u32],
    opts: &GenerateOptions,
    stop: Option<StopFn<'_>>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Generation>> {
    let mut out = vec![
        Generation {
            ids: vec![],
            stop: StopReason::MaxTokens,
            first_mass: None,
        };
        prefix.num_prompts
    ];
    let start = prefix.start_layer;
    // The shared head through the (possibly scaled) upper layers, once for every batch.
    let upper = match &prefix.head_x {
        Some(x) => Some(run_head(dec, x.clone(), start..dec.num_layers())?.0),
        None => None,
    };
    for b in &prefix.batches {
        let first = First::FromLayer(b.x.clone(), start);
        let mut kv = b.kv.clone();
        if let Some(u) = &upper {
            for l in start..dec.num_layers() {
                kv.layers[l] = u.layers[l].clone();
            }
        }
        let results = crate::kernels::on_workers(|| {
            decode_batch(dec, first, &b.idx, b.pads.clone(), kv, eos, opts, stop)
        })?;
        for (&i, r) in b.idx.iter().zip(results) {
            out[i] = r;
        }
        progress(b.idx.len());
    }
    Ok(out)
}

fn stop_reason(ids: &[u32], eos: &[u32], opts: &GenerateOptions) -> StopReason {
    match ids.last() {
        Some(t) if !opts.ignore_eos && eos.contains(t) => StopReason::Eos,
        _ => StopReason::MaxTokens,
    }
}

enum First {
    Ids(Tensor),
    FromLayer(Tensor, usize),
}

#[allow(clippy::too_many_arguments)]
fn decode_batch(
    dec: &Decoder,
    first: First,
    prompt_idx: &[usize],
    mut pads: Vec<usize>,
    mut cache: KvCache,
    eos: &[u32],
    opts: &GenerateOptions,
    stop: Option<StopFn<'_>>,
) -> Result<Vec<Generation>> {
    let mut outputs: Vec<Generation> = vec![
        Generation {
            ids: vec![],
            stop: StopReason::MaxTokens,
            first_mass: None,
        };
        prompt_idx.len()
    ];
    if opts.max_new_tokens == 0 {
        return Ok(outputs);
    }
    // Rows of the current batch tensor, as positions in `prompt_idx`.
    let mut active: Vec<usize> = (0..prompt_idx.len()).collect();
    let mut input: Option<Tensor> = None;
    let mut first = Some(first);
    for step in 0..opts.max_new_tokens {
        let logits = match (first.take(), input.take()) {
            (Some(First::Ids(ids)), _) => {
                dec.logits(&ids, &pads, Some(&mut cache), Logits::Last)?
            }
            (Some(First::FromLayer(x, l)), _) => {
                dec.logits_from(x, l, &pads, Some(&mut cache), Logits::Last)?
            }
            (None, Some(ids)) => dec.logits(&ids, &pads, Some(&mut cache), Logits::Last)?,
            (None, None) => unreachable!("input set after the first step"),
        };
        let picked = pick_rows(&logits.squeeze(1)?, opts, step == 0)?;
        let mut keep = Vec::new();
        let mut next = Vec::new();
        for (pos, (&row, (tok, mass))) in active.iter().zip(picked).enumerate() {
            let g = &mut outputs[row];
            if step == 0 {
                g.first_mass = mass;
            }
            g.ids.push(tok);
            if !opts.ignore_eos && eos.contains(&tok) {
                g.stop = StopReason::Eos;
            } else if stop.is_some_and(|f| f(prompt_idx[row], &g.ids)) {
                g.stop = StopReason::Caller;
            } else {
                keep.push(pos);
                next.push(tok);
            }
        }
        if keep.is_empty() || step + 1 == opts.max_new_tokens {
            break;
        }
        if keep.len() != active.len() {
            let idx = Tensor::from_vec(
                keep.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                keep.len(),
                &dec.device,
            )?;
            cache.select_rows(&idx)?;
            pads = keep.iter().map(|&p| pads[p]).collect();
            active = keep.iter().map(|&p| active[p]).collect();
        }
        input = Some(Tensor::from_vec(next, (active.len(), 1), &dec.device)?);
    }
    Ok(outputs)
}

/// Reference path: every step re-runs the full sequence.
fn greedy_batch_uncached(
    dec: &Decoder,
    rows: &[&[u32]],
    eos: &[u32],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let mut seqs: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    let mut masses = vec![None; rows.len()];
    let mut done = vec![false; rows.len()];
    for step in 0..opts.max_new_tokens {
        let active: Vec<usize> = (0..rows.len()).filter(|&i| !done[i]).collect();
        if active.is_empty() {
            break;
        }
        let batch: Vec<&[u32]> = active.iter().map(|&i| seqs[i].as_slice()).collect();
        let (ids, pads) = left_pad(&batch, &dec.device)?;
        let logits = dec
            .logits(&ids, &pads, None, Logits::Last)?
            .squeeze(1)?
            .to_vec2::<f32>()?;
        for (pos, &i) in active.iter().enumerate() {
            let tok = argmax(&logits[pos]);
            if step == 0 {
                masses[i] = first_mass(opts, &logits[pos]);
            }
            outputs[i].push(tok);
            seqs[i].push(tok);
            if !opts.ignore_eos && eos.contains(&tok) {
                done[i] = true;
            }
        }
    }
    Ok(outputs
        .into_iter()
        .zip(masses)
        .map(|(ids, first_mass)| Generation {
            stop: stop_reason(&ids, eos, opts),
            ids,
            first_mass,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{argmax, argmax_scalar};
    use crate::kernels::pseudo;

    /// The lane-wise argmax gives the loop's index on every length and tail, on ties (also
    /// between -0 and +0), infinities, and NaN anywhere (first, inside, in the tail, alone).
    #[test]
    fn argmax_is_the_loops_index() {
        let mut cases: Vec<Vec<f32>> =
            vec![vec![], vec![f32::NAN], vec![-0.0, 0.0], vec![0.0, -0.0]];
        for n in [1, 15, 16, 17, 33, 100, 49152] {
            let v = pseudo(n, n as u64);
            cases.push(v.clone());
            // Ties: the maximum copied later on, and rounded to few values.
            let mut t: Vec<f32> = v.iter().map(|x| (x * 2.0).round()).collect();
            cases.push(t.clone());
            t.reverse();
            cases.push(t);
            cases.push(vec![f32::NEG_INFINITY; n]);
            let mut inf = v.clone();
            inf[n / 2] = f32::INFINITY;
            cases.push(inf);
            for at in [0, n / 2, n - 1] {
                let mut w = v.clone();
                w[at] = f32::NAN;
                cases.push(w);
            }
        }
        for (i, v) in cases.iter().enumerate() {
            assert_eq!(argmax(v), argmax_scalar(v), "case {i} (len {})", v.len());
        }
    }
}
