//! Precise localisation (paper §3.4-3.5, A.3.3-A.3.4): scale a candidate range's weights by alpha,
//! count the over-rejection queries the model now refuses, and move the upper then the lower
//! bound to the range with the most refusals (the fewest when alpha < 1).

pub mod file;
pub mod report;

use crate::judges::Judge;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sl_engine::infer::generate::{
    greedy_from_prefix, greedy_with, GenerateOptions, Generation, PrefixCache, StopReason,
};
use sl_engine::{LayerRange, Model, Prompt, ScaleTarget};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "value")]
pub enum AlphaMode {
    Fixed(f64),
    /// A.3.4: step away from 1 by 0.05 until the std of the lower-bound sweep's counts reaches
    /// this many refusals per 721 queries (scaled to the set size).
    Auto {
        std_threshold_per_721: f64,
    },
}

impl AlphaMode {
    /// `--alpha`: a number (positive, finite, not 1), or `auto` with the lower sweep's count std
    /// to stop at (per 721 queries).
    pub fn parse(s: &str, std_threshold_per_721: f64) -> Result<AlphaMode> {
        if s == "auto" {
            return Ok(AlphaMode::Auto {
                std_threshold_per_721,
            });
        }
        let x: f64 = s
            .parse()
            .map_err(|_| anyhow::anyhow!("--alpha `{s}`: expected a number or `auto`"))?;
        if !x.is_finite() || x <= 0.0 || x == 1.0 {
            bail!("--alpha {x}: must be a positive finite number other than 1");
        }
        Ok(AlphaMode::Fixed(x))
    }
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
    /// Judge by the first-token probe (calibrated against the text judge) instead of generating.
    pub probe: bool,
    /// What the scaling multiplies: the weights (the paper's) or the layers' residual
    /// contributions (the same intervention on every family).
    pub scale_target: ScaleTarget,
}

/// One judged response.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    pub prompt: String,
    pub response: String,
    pub output_ids: Vec<u32>,
    pub refusal: bool,
    pub stop: StopReason,
    /// The probe's score, when the probe judged this prompt (no response was generated).
    pub probe_score: Option<f64>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    /// "upper" (i fixed, j moves) or "lower" (j fixed, i moves).
    pub kind: String,
    pub alpha: f64,
    pub tried: Vec<(LayerRange, usize)>,
    pub best: LayerRange,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    probe_ids: Vec<u32>,
    pub calibration: Option<crate::judges::probe::Calibration>,
}

/// The bound with the most refusals (the fewest when `maximise` is false); among equal counts the
/// one nearest `centre`, so a flat sweep stays where it began instead of drifting to an edge.
pub fn best_bound(tried: impl Iterator<Item = (i64, usize)>, centre: i64, maximise: bool) -> i64 {
    let better = |a: usize, b: usize| if maximise { a > b } else { a < b };
    tried
        .fold(None::<(i64, usize)>, |acc, (b, c)| match acc {
            Some((ab, ac))
                if !(better(c, ac) || (c == ac && (b - centre).abs() < (ab - centre).abs())) =>
            {
                acc
            }
            _ => Some((b, c)),
        })
        .map(|(b, _)| b)
        .expect("at least one bound tried")
}

fn key(alpha: f64) -> i64 {
    (alpha * 1000.0).round() as i64
}

impl<'a> Locator<'a> {
    pub fn new(
        model: &'a mut Model,
        prompts: Vec<Prompt>,
        judge: Judge,
        cfg: LocateConfig,
    ) -> Result<Self> {
        if prompts.is_empty() {
            bail!("the over-rejection set is empty");
        }
        let ids = prompts.iter().map(|p| p.ids.clone()).collect();
        let probe_ids = if cfg.probe {
            crate::judges::probe::first_tokens(&model.tokenizer)?
        } else {
            vec![]
        };
        Ok(Locator {
            model,
            prompts,
            ids,
            judge,
            cfg,
            runs: BTreeMap::new(),
            prefix: None,
            probe_ids,
            calibration: None,
        })
    }

    pub fn num_prompts(&self) -> usize {
        self.prompts.len()
    }

    /// Refusals with `range` scaled by `alpha` (None: the unscaled model). Runs are memoised.
    pub fn count(
        &mut self,
        range: Option<LayerRange>,
        alpha: f64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<usize> {
        let range = if alpha == 1.0 { None } else { range };
        if let Some(r) = self.runs.get(&(range, key(alpha))) {
            return Ok(r.refusals);
        }
        let t0 = std::time::Instant::now();
        let responses = match &self.calibration {
            Some(cal) if self.cfg.probe => {
                let threshold = cal.threshold;
                let scores = self.probe_scores(range, alpha)?;
                progress(scores.len());
                self.prompts
                    .iter()
                    .zip(scores)
                    .map(|(p, s)| Judged {
                        prompt: p.record.instruction.clone(),
                        response: String::new(),
                        output_ids: vec![],
                        refusal: s >= threshold,
                        stop: StopReason::Caller,
                        probe_score: Some(s),
                    })
                    .collect()
            }
            _ => self.generate_judged(range, alpha, self.cfg.early_stop, progress)?,
        };
        let refusals = responses.iter().filter(|r| r.refusal).count();
        self.runs.insert(
            (range, key(alpha)),
            Run {
                range,
                alpha,
                refusals,
                seconds: t0.elapsed().as_secs_f64(),
                responses,
            },
        );
        Ok(refusals)
    }

    /// Scales `range` (None: nothing), using the prefix cache of the layers below it when on.
    fn prepare(&mut self, range: Option<LayerRange>, alpha: f64) -> Result<bool> {
        self.model.decoder.restore_scaling();
        let Some(r) = range else { return Ok(false) };
        let use_prefix = self.cfg.prefix_cache && r.first > 0;
        if use_prefix
            && self
                .prefix
                .as_ref()
                .map(|p| p.start_layer != r.first)
                .unwrap_or(true)
        {
            // Built with the unscaled weights of the layers below the range.
            self.prefix = None;
            self.prefix = Some(PrefixCache::build(
                &self.model.decoder,
                &self.ids,
                self.cfg.batch_size,
                r.first,
            )?);
        }
        self.model
            .decoder
            .scale_layers_with(r, alpha, self.cfg.scale_target)?;
        Ok(use_prefix)
    }

    /// Greedy responses with `range` scaled, judged by the text judge.
    pub fn generate_judged(
        &mut self,
        range: Option<LayerRange>,
        alpha: f64,
        early_stop: bool,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Judged>> {
        let opts = GenerateOptions {
            max_new_tokens: self.cfg.max_new_tokens,
            batch_size: self.cfg.batch_size,
            ignore_eos: false,
            no_cache: false,
            first_mass_of: vec![],
        };
        let use_prefix = self.prepare(range, alpha)?;
        let tok = &self.model.tokenizer;
        let judge = &self.judge;
        let stop_fn = |_: usize, ids: &[u32]| -> bool {
            tok.decode(ids, true)
                .ok()
                .and_then(|t| judge.decided(&t))
                .is_some()
        };
        let stop: Option<sl_engine::infer::generate::StopFn<'_>> =
            if early_stop { Some(&stop_fn) } else { None };
        let eos = &self.model.eos_token_ids;
        let gens: Vec<Generation> = if use_prefix {
            greedy_from_prefix(
                &self.model.decoder,
                self.prefix.as_ref().expect("prepared"),
                eos,
                &opts,
                stop,
                progress,
            )?
        } else {
            greedy_with(&self.model.decoder, &self.ids, eos, &opts, stop, progress)?
        };
        self.model.decoder.restore_scaling();
        let mut out = Vec::with_capacity(gens.len());
        for (p, g) in self.prompts.iter().zip(gens) {
            let response = self.model.tokenizer.decode(&g.ids, true)?;
            let refusal = self.judge.is_refusal(&response);
            out.push(Judged {
                prompt: p.record.instruction.clone(),
                response,
                output_ids: g.ids,
                refusal,
                stop: g.stop,
                probe_score: None,
            });
        }
        Ok(out)
    }

    fn probe_scores(&mut self, range: Option<LayerRange>, alpha: f64) -> Result<Vec<f64>> {
        let use_prefix = self.prepare(range, alpha)?;
        let prefix = if use_prefix {
            self.prefix.as_ref()
        } else {
            None
        };
        let s = crate::judges::probe::scores(
            &self.model.decoder,
            &self.ids,
            self.cfg.batch_size,
            &self.probe_ids,
            prefix,
        );
        self.model.decoder.restore_scaling();
        s
    }

    /// Calibrates the probe's threshold against the text judge on generated responses of the
    /// unscaled model and of `range` scaled by `alpha` (so both verdicts occur).
    pub fn calibrate_probe(
        &mut self,
        range: LayerRange,
        alpha: f64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        for r in [None, Some(range)] {
            let judged = self.generate_judged(r, alpha, false, progress)?;
            labels.extend(judged.iter().map(|j| j.refusal));
            scores.extend(self.probe_scores(r, alpha)?);
        }
        self.calibration = Some(crate::judges::probe::calibrate(&scores, &labels));
        Ok(())
    }

    /// Share of prompts where the probe's verdict on a run equals the text judge's verdict on the
    /// responses it replaced (generated now for that run).
    pub fn probe_agreement(
        &mut self,
        range: Option<LayerRange>,
        alpha: f64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Option<f64>> {
        let Some(run) = self
            .runs
            .get(&(if alpha == 1.0 { None } else { range }, key(alpha)))
        else {
            return Ok(None);
        };
        if run.responses.first().and_then(|r| r.probe_score).is_none() {
            return Ok(None);
        }
        let verdicts: Vec<bool> = run.responses.iter().map(|r| r.refusal).collect();
        let judged = self.generate_judged(range, alpha, false, progress)?;
        let same = verdicts
            .iter()
            .zip(&judged)
            .filter(|(v, j)| **v == j.refusal)
            .count();
        Ok(Some(same as f64 / verdicts.len().max(1) as f64))
    }

    /// Moves one bound of `start` over bound-span..bound+span (extended past the edge while the
    /// best sits on it) and keeps the best range.
    pub fn sweep(
        &mut self,
        start: LayerRange,
        upper: bool,
        alpha: f64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Sweep> {
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
            let best_b = best_bound(tried.iter().map(|(b, v)| (*b, v.1)), centre, maximise);
            // Interior: both neighbours tried (or outside the model). Else extend that way.
            if best_b == *tried.keys().next().unwrap() && make(best_b - 1).is_some() {
                lo = best_b - 1;
            } else if best_b == *tried.keys().last().unwrap() && make(best_b + 1).is_some() {
                hi = best_b + 1;
            } else {
                let best = tried[&best_b].0;
                return Ok(Sweep {
                    kind: if upper { "upper" } else { "lower" }.into(),
                    alpha,
                    tried: tried.into_values().collect(),
                    best,
                });
            }
        }
    }

    /// Chooses alpha by A.3.4: away from 1 in steps of 0.05 (up unless the baseline already
    /// refuses more than half the set), until the lower-bound sweep's count std reaches the
    /// threshold (scaled to the set size). Returns every step tried.
    pub fn auto_alpha(
        &mut self,
        initial: LayerRange,
        threshold_per_721: f64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(f64, Vec<AlphaStep>)> {
        let baseline = self.count(None, 1.0, progress)?;
        let up = baseline * 2 <= self.num_prompts();
        let threshold = threshold_per_721 * self.num_prompts() as f64 / 721.0;
        let mut steps = Vec::new();
        for k in 1..=10 {
            let alpha = if up {
                1.0 + 0.05 * k as f64
            } else {
                1.0 - 0.05 * k as f64
            };
            let alpha = (alpha * 100.0).round() / 100.0;
            let sweep = self.sweep(initial, false, alpha, progress)?;
            let counts: Vec<usize> = sweep.tried.iter().map(|(_, c)| *c).collect();
            let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
            let std = (counts
                .iter()
                .map(|c| (*c as f64 - mean).powi(2))
                .sum::<f64>()
                / counts.len() as f64)
                .sqrt();
            steps.push(AlphaStep {
                alpha,
                lower_sweep_counts: counts,
                std,
            });
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

    pub fn probe_enabled(&self) -> bool {
        self.cfg.probe
    }
}

#[cfg(test)]
mod tests {
    use super::best_bound;

    #[test]
    fn best_bound_by_hand() {
        // Table 1, Llama-3 upper sweep:
        // [7,10] 272, [7,11] 241, [7,12] 283*, [7,13] 266, [7,14] 256.
        let upper = [(10, 272), (11, 241), (12, 283), (13, 266), (14, 256)];
        assert_eq!(best_bound(upper.into_iter(), 12, true), 12);
        // Phi-3 (alpha < 1, minimum wins):
        // [11,13] 209, [11,14] 190, [11,15] 149*, [11,16] 181, [11,17] 189.
        let phi = [(13, 209), (14, 190), (15, 149), (16, 181), (17, 189)];
        assert_eq!(best_bound(phi.into_iter(), 15, false), 15);
        // A flat sweep keeps the starting bound; a strict best at the edge is taken (and extended).
        assert_eq!(
            best_bound(
                [(8, 0), (9, 0), (10, 0), (11, 0), (12, 0)].into_iter(),
                10,
                true
            ),
            10
        );
        assert_eq!(
            best_bound(
                [(8, 5), (9, 0), (10, 0), (11, 0), (12, 0)].into_iter(),
                10,
                true
            ),
            8
        );
    }
}
