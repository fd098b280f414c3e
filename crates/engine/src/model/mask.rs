//! Attention masks and position ids of one forward call over left-padded rows, and the
//! per-call context (masks, rope angles) every layer shares.

use crate::io::config::AttentionKind;
use crate::model::Decoder;
use anyhow::Result;
use candle_core::Tensor;

/// Where each row's tokens sit in a call: `shared` prompt-head positions common to every row,
/// then the row's left padding, then its own tokens; the call computes the `new_tokens`
/// positions after `past` cached ones.
#[derive(Debug, Clone, Copy)]
pub struct PadLayout {
    pub shared: usize,
    pub past: usize,
    pub new_tokens: usize,
}

impl PadLayout {
    fn is_pad(&self, i: usize, pad: usize) -> bool {
        i >= self.shared && i < self.shared + pad
    }

    /// Position id of sequence index `i` in a row with `pad` padding tokens. Ids count real
    /// tokens only; a pad gets 0, as transformers' left padding does.
    pub fn position(&self, i: usize, pad: usize) -> usize {
        if i < self.shared {
            i
        } else if self.is_pad(i, pad) {
            0
        } else {
            i - pad
        }
    }

    /// Additive masks `[B, new_tokens, past + new_tokens]` (0 or -inf): causal, padding keys
    /// hidden, and with `window` only keys fewer than `window` positions back. A padding query
    /// sees only itself, so no softmax row is empty.
    pub fn additive_mask(&self, pads: &[usize], window: Option<usize>) -> Vec<f32> {
        let (t_new, total) = (self.new_tokens, self.past + self.new_tokens);
        let mut m = vec![0f32; pads.len() * t_new * total];
        for (r, &pad) in pads.iter().enumerate() {
            for t in 0..t_new {
                let i = self.past + t;
                let row = &mut m[(r * t_new + t) * total..(r * t_new + t + 1) * total];
                for (j, v) in row.iter_mut().enumerate() {
                    let mut ok = j <= i && !self.is_pad(j, pad);
                    if let (Some(w), true) = (window, ok) {
                        ok = self.position(i, pad) - self.position(j, pad) < w;
                    }
                    if self.is_pad(i, pad) {
                        ok = j == i;
                    }
                    if !ok {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
        }
        m
    }
}

/// Everything about the current call that all layers share: masks and rope angles.
pub struct StepCtx {
    pub batch: usize,
    pub new_tokens: usize,
    pub past: usize,
    /// Additive masks `[B, 1, T, S]` as tensors, for the differentiable path only.
    pub(crate) mask_full: Option<Tensor>,
    pub(crate) mask_sliding: Option<Tensor>,
    /// The masks as `[B, T, S]` slices for the CPU attention kernel.
    pub(crate) mask_full_raw: Vec<f32>,
    pub(crate) mask_sliding_raw: Option<Vec<f32>>,
    pub(crate) rope_global: (Tensor, Tensor),
    pub(crate) rope_local: Option<(Tensor, Tensor)>,
    pub differentiable: bool,
}

impl Decoder {
    /// Masks and rope angles for `new_tokens` tokens appended after `past` cached ones, rows
    /// left-padded by `pads[b]` tokens.
    pub fn step_ctx(
        &self,
        pads: &[usize],
        past: usize,
        new_tokens: usize,
        differentiable: bool,
    ) -> Result<StepCtx> {
        self.step_ctx_shared(pads, 0, past, new_tokens, differentiable)
    }

    /// As `step_ctx`, with each row's padding after a prefix of `shared` positions that every
    /// row has (computed once: see `KvCache::from_shared`).
    pub fn step_ctx_shared(
        &self,
        pads: &[usize],
        shared: usize,
        past: usize,
        new_tokens: usize,
        differentiable: bool,
    ) -> Result<StepCtx> {
        let b = pads.len();
        let total = past + new_tokens;
        let window = self.cfg.sliding_window;
        let needs_sliding = self.cfg.layer_types.contains(&AttentionKind::Sliding);
        let layout = PadLayout {
            shared,
            past,
            new_tokens,
        };
        let mask_full_raw = layout.additive_mask(pads, None);
        let mask_sliding_raw = if needs_sliding {
            Some(layout.additive_mask(pads, window))
        } else {
            None
        };
        let as_tensor =
            |m: &Vec<f32>| Tensor::from_vec(m.clone(), (b, 1, new_tokens, total), &self.device);
        let positions: Vec<Vec<u32>> = pads
            .iter()
            .map(|&pad| {
                (past..total)
                    .map(|i| layout.position(i, pad) as u32)
                    .collect()
            })
            .collect();
        let seq_len = pads
            .iter()
            .map(|&p| total - p.min(total))
            .max()
            .unwrap_or(0);
        Ok(StepCtx {
            batch: b,
            new_tokens,
            past,
            mask_full: if differentiable {
                Some(as_tensor(&mask_full_raw)?)
            } else {
                None
            },
            mask_sliding: match &mask_sliding_raw {
                Some(m) if differentiable => Some(as_tensor(m)?),
                _ => None,
            },
            mask_full_raw,
            mask_sliding_raw,
            rope_global: self
                .rope_global
                .cos_sin(&positions, seq_len, &self.device)?,
            rope_local: match &self.rope_local {
                Some(r) => Some(r.cos_sin(&positions, seq_len, &self.device)?),
                None => None,
            },
            differentiable,
        })
    }
}
