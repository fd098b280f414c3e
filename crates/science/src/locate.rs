//! Precise localisation (paper §3.4-3.5, A.3.3-A.3.4): scale a candidate range's weights by alpha,
//! count the over-rejection queries the model now refuses, and move the upper then the lower
//! bound to the range with the most refusals (the fewest when alpha < 1).

use crate::judges::Judge;
use anyhow::{bail, Result};
use serde::Serialize;
use sl_engine::generate::{greedy_from_prefix, greedy_with, GenerateOptions, Generation, PrefixCache, StopReason};
use sl_engine::{LayerRange, Model, Prompt};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "value")]
pub enum AlphaMode {
    Fixed(f64),
    /// A.3.4: step away from 1 by 0.05 until the std of the lower-bound sweep's counts reaches
    /// this many refusals per 721 queries (scaled to the set size).
    Auto { std_threshold_per_721: f64 },
}

#[derive(Debug, Clone)]
pub struct LocateConfig {
    pub alpha: AlphaMode,
    pub span: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// Reuse the residual stream and KV cache of the layers below each range's lower bound.
    pub prefix_cache: bool,
    /// Stop a sequence as soon as the judge's verdict can no longer change.
    pub early_stop: bool,
}

/// One judged response.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    pub prompt: String,
    pub response: String,
    pub output_ids: Vec<u32>,
    pub refusal: bool,
    pub stop: StopReason,
}

/// One scaled run: a range (None = the unscaled baseline) at an alpha.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub range: Option<LayerRange>,
    pub alpha: f64,
    pub refusals: usize,
    pub seconds: f64,
    #[serde(skip)]
    pub responses: Vec<Judged>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// "upper" (i fixed, j moves) or "lower" (j fixed, i moves).
    pub kind: &'static str,
    pub alpha: f64,
    pub tried: Vec<(LayerRange, usize)>,
    pub best: LayerRange,
}

#[derive(Debug, Clone, Serialize)]
pub struct AlphaStep {
    pub alpha: f64,
    pub lower_sweep_counts: Vec<usize>,
    pub std: f64,
}

pub struct Locator<'a> {
    pub model: &'a mut Model,
    prompts: Vec<Prompt>,
    ids: Vec<Vec<u32>>,
    judge: Judge,
    cfg: LocateConfig,
    /// Every run, by (range, alpha in thousandths).
    pub runs: BTreeMap<(Option<LayerRange>, i64), Run>,
    prefix: Option<PrefixCache>,
}

fn key(alpha: f64) -> i64 {
    (alpha * 1000.0).round() as i64
}

impl<'a> Locator<'a> {
    pub fn new(model: &'a mut Model, prompts: Vec<Prompt>, judge: Judge, cfg: LocateConfig) -> Result<Self> {
        if prompts.is_empty() {
            bail!("the over-rejection set is empty");
        }
        let ids = prompts.iter().map(|p| p.ids.clone()).collect();
        Ok(Locator { model, prompts, ids, judge, cfg, runs: BTreeMap::new(), prefix: None })
    }

    pub fn num_prompts(&self) -> usize {
        self.prompts.len()
    }

    /// Refusals with `range` scaled by `alpha` (None: the unscaled model). Runs are memoised.
    pub fn count(&mut self, range: Option<LayerRange>, alpha: f64, progress: &mut dyn FnMut(usize)) -> Result<usize> {
        let range = if alpha == 1.0 { None } else { range };
        if let Some(r) = self.runs.get(&(range, key(alpha))) {
            return Ok(r.refusals);
        }
        let t0 = std::time::Instant::now();
        let opts = GenerateOptions { max_new_tokens: self.cfg.max_new_tokens, batch_size: self.cfg.batch_size, ignore_eos: false, no_cache: false };
        let tok = &self.model.tokenizer;
        let judge = &self.judge;
        let stop_fn = |_: usize, ids: &[u32]| -> bool {
            tok.decode(ids, true).ok().and_then(|t| judge.decided(&t)).is_some()
        };
        let stop: Option<sl_engine::generate::StopFn<'_>> = if self.cfg.early_stop { Some(&stop_fn) } else { None };
        let eos = self.model.eos_token_ids.clone();
        let gens: Vec<Generation> = match range {
            None => {
                self.model.decoder.restore_scaling();
                greedy_with(&self.model.decoder, &self.ids, &eos, &opts, stop, progress)?
            }
            Some(r) => {
                if self.cfg.prefix_cache && r.first > 0 {
                    let stale = self.prefix.as_ref().map(|p| p.start_layer != r.first).unwrap_or(true);
                    if stale {
                        // Built with the unscaled weights of the layers below the range.
                        self.model.decoder.restore_scaling();
                        self.prefix = None;
                        self.prefix = Some(PrefixCache::build(&self.model.decoder, &self.ids, self.cfg.batch_size, r.first)?);
                    }
                    self.model.decoder.scale_layers(r, alpha)?;
                    let p = self.prefix.as_ref().expect("built above");
                    greedy_from_prefix(&self.model.decoder, p, &eos, &opts, stop, progress)?
                } else {
                    self.model.decoder.scale_layers(r, alpha)?;
                    greedy_with(&self.model.decoder, &self.ids, &eos, &opts, stop, progress)?
                }
            }
        };
        self.model.decoder.restore_scaling();
        let mut responses = Vec::with_capacity(gens.len());
        for (p, g) in self.prompts.iter().zip(gens) {
            let response = self.model.tokenizer.decode(&g.ids, true)?;
            let refusal = self.judge.is_refusal(&response);
            responses.push(Judged { prompt: p.record.instruction.clone(), response, output_ids: g.ids, refusal, stop: g.stop });
        }
        let refusals = responses.iter().filter(|r| r.refusal).count();
        self.runs.insert((range, key(alpha)), Run { range, alpha, refusals, seconds: t0.elapsed().as_secs_f64(), responses });
        Ok(refusals)
    }

    /// Moves one bound of `start` over bound-span..bound+span (extended past the edge while the
    /// best sits on it) and keeps the best range.
    pub fn sweep(&mut self, start: LayerRange, upper: bool, alpha: f64, progress: &mut dyn FnMut(usize)) -> Result<Sweep> {
        let n_layers = self.model.decoder.num_layers();
        let maximise = alpha > 1.0;
        let make = |b: i64| -> Option<LayerRange> {
            if b < 0 {
                return None;
            }
            let b = b as usize;
            if upper {
                LayerRange::new(start.first, b, n_layers).ok()
            } else {
                LayerRange::new(b, start.last, n_layers).ok()
            }
        };
        let centre = if upper { start.last } else { start.first } as i64;
        let span = self.cfg.span as i64;
        let (mut lo, mut hi) = (centre - span, centre + span);
        let mut tried: BTreeMap<i64, (LayerRange, usize)> = BTreeMap::new();
        loop {
            for b in lo..=hi {
                if tried.contains_key(&b) {
                    continue;
                }
                if let Some(r) = make(b) {
                    let c = self.count(Some(r), alpha, progress)?;
                    tried.insert(b, (r, c));
                }
            }
            let better = |a: usize, b: usize| if maximise { a > b } else { a < b };
            let (&best_b, &(_, best_c)) = tried
                .iter()
                .fold(None::<(&i64, &(LayerRange, usize))>, |acc, (b, v)| match acc {
                    Some((_, w)) if !better(v.1, w.1) => acc,
                    _ => Some((b, v)),
                })
                .expect("at least the starting range is valid");
            let _ = best_c;
            // Interior: both neighbours tried (or outside the model). Else extend that way.
            if best_b == *tried.keys().next().unwrap() && make(best_b - 1).is_some() {
                lo = best_b - 1;
            } else if best_b == *tried.keys().last().unwrap() && make(best_b + 1).is_some() {
                hi = best_b + 1;
            } else {
                let best = tried[&best_b].0;
                return Ok(Sweep { kind: if upper { "upper" } else { "lower" }, alpha, tried: tried.into_values().collect(), best });
            }
        }
    }

    /// Chooses alpha by A.3.4: away from 1 in steps of 0.05 (up unless the baseline already
    /// refuses more than half the set), until the lower-bound sweep's count std reaches the
    /// threshold (scaled to the set size). Returns every step tried.
    pub fn auto_alpha(&mut self, initial: LayerRange, threshold_per_721: f64, progress: &mut dyn FnMut(usize)) -> Result<(f64, Vec<AlphaStep>)> {
        let baseline = self.count(None, 1.0, progress)?;
        let up = baseline * 2 <= self.num_prompts();
        let threshold = threshold_per_721 * self.num_prompts() as f64 / 721.0;
        let mut steps = Vec::new();
        for k in 1..=10 {
            let alpha = if up { 1.0 + 0.05 * k as f64 } else { 1.0 - 0.05 * k as f64 };
            let alpha = (alpha * 100.0).round() / 100.0;
            let sweep = self.sweep(initial, false, alpha, progress)?;
            let counts: Vec<usize> = sweep.tried.iter().map(|(_, c)| *c).collect();
            let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
            let std = (counts.iter().map(|c| (*c as f64 - mean).powi(2)).sum::<f64>() / counts.len() as f64).sqrt();
            steps.push(AlphaStep { alpha, lower_sweep_counts: counts, std });
            if std >= threshold {
                return Ok((alpha, steps));
            }
        }
        let last = steps.last().map(|s| s.alpha).unwrap_or(1.0);
        Ok((last, steps))
    }

    pub fn judge(&self) -> &Judge {
        &self.judge
    }
}
