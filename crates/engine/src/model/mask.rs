//! Attention masks and position ids of one forward call over left-padded rows, and the
//! per-call context (masks, rope angles) every layer shares.

use crate::io::config::AttentionKind;
use crate::model::live::LiveRows;
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
    pub(crate) fn is_pad(&self, i: usize, pad: usize) -> bool {
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
                    // A padding query is decided first: its position (0) is below those of the
                    // shared head, so the window's difference would underflow.
                    let ok = if self.is_pad(i, pad) {
                        j == i
                    } else if j > i || self.is_pad(j, pad) {
                        false
                    } else {
                        match window {
                            Some(w) => self.position(i, pad) - self.position(j, pad) < w,
                            None => true,
                        }
                    };
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
    /// The masks as `[B, T, S]` slices for the CPU attention kernel.
    pub(crate) mask_full_raw: Vec<f32>,
    pub(crate) mask_sliding_raw: Option<Vec<f32>>,
    /// The masks as `[B, 1, T, S]` f32 tensors on the decoder's device, made only off the CPU
    /// (the CPU kernel reads the raw values).
    pub(crate) mask_full: Option<Tensor>,
    pub(crate) mask_sliding: Option<Tensor>,
    pub(crate) rope_global: (Tensor, Tensor),
    pub(crate) rope_local: Option<(Tensor, Tensor)>,
    /// The real-token rows when some are padding and the CPU kernels run: the projections skip
    /// the rest.
    pub(crate) live: Option<LiveRows>,
}

impl StepCtx {
    /// `f` (a projection) on the call's real-token rows only, its result scattered back with
    /// zeros in the padding rows (`LiveRows`); on all of `x` when no row is skipped.
    pub(crate) fn on_live_rows(
        &self,
        x: &Tensor,
        f: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match &self.live {
            Some(live) => live.scatter(&f(&live.gather(x)?)?, self.batch, self.new_tokens),
            None => f(x),
        }
    }
}

impl Decoder {
    /// Masks and rope angles for `new_tokens` tokens appended after `past` cached ones, rows
    /// left-padded by `pads[b]` tokens.
    pub fn step_ctx(&self, pads: &[usize], past: usize, new_tokens: usize) -> Result<StepCtx> {
        self.step_ctx_shared(pads, 0, past, new_tokens)
    }

    /// As `step_ctx`, with each row's padding after a prefix of `shared` positions that every
    /// row has (computed once: see `KvCache::from_shared`).
    pub fn step_ctx_shared(
        &self,
        pads: &[usize],
        shared: usize,
        past: usize,
        new_tokens: usize,
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
        let on_device = |m: &Vec<f32>| -> Result<Option<Tensor>> {
            if !self.portable {
                return Ok(None);
            }
            Ok(Some(Tensor::from_slice(
                m,
                (b, 1, new_tokens, total),
                &self.device,
            )?))
        };
        // Angles in f32, applied in the activations' dtype (as transformers casts them).
        let angles = |r: &crate::model::rope::Rope| -> Result<(Tensor, Tensor)> {
            let (c, s) = r.cos_sin(&positions, seq_len, &self.device)?;
            Ok((c.to_dtype(self.act_dtype)?, s.to_dtype(self.act_dtype)?))
        };
        Ok(StepCtx {
            batch: b,
            new_tokens,
            past,
            mask_full: on_device(&mask_full_raw)?,
            mask_sliding: match &mask_sliding_raw {
                Some(m) => on_device(m)?,
                None => None,
            },
            mask_full_raw,
            mask_sliding_raw,
            live: if self.device.is_cpu() && !self.portable {
                LiveRows::of(&layout, pads)
            } else {
                None
            },
            rope_global: angles(&self.rope_global)?,
            rope_local: match &self.rope_local {
                Some(r) => Some(angles(r)?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::PadLayout;

    /// splitmix64: a fixed seed gives the same cases on every run, without a dependency.
    struct Cases(u64);

    impl Cases {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
    }

    /// A random small layout: shared head 0..3, past 0..4, new tokens 1..4, 1..4 rows with
    /// 0..3 pads each, every row keeping at least one token of its own.
    fn layout(c: &mut Cases) -> (PadLayout, Vec<usize>, Option<usize>) {
        loop {
            let l = PadLayout {
                shared: c.below(4),
                past: c.below(5),
                new_tokens: 1 + c.below(4),
            };
            if l.shared >= l.past + l.new_tokens {
                continue;
            }
            // At most this many pads leave the row a token after its shared head.
            let room = l.past + l.new_tokens - l.shared - 1;
            let pads = (0..1 + c.below(4)).map(|_| c.below(4).min(room)).collect();
            let window = [None, Some(1), Some(2), Some(3), Some(5)][c.below(5)];
            return (l, pads, window);
        }
    }

    /// The rule restated from scratch: a token's position counts the real tokens before it.
    fn naive_visible(l: &PadLayout, pad: usize, i: usize, j: usize, w: Option<usize>) -> bool {
        let pad_at = |k: usize| (l.shared..l.shared + pad).contains(&k);
        let pos = |k: usize| (0..k).filter(|&x| !pad_at(x)).count();
        if pad_at(i) {
            return j == i;
        }
        j <= i
            && !pad_at(j)
            && match w {
                Some(w) => pos(i) - pos(j) < w,
                None => true,
            }
    }

    #[test]
    fn masks_and_positions_keep_their_invariants() {
        let mut c = Cases(19);
        for case in 0..20_000 {
            let (l, pads, window) = layout(&mut c);
            let total = l.past + l.new_tokens;
            let m = l.additive_mask(&pads, window);
            assert_eq!(m.len(), pads.len() * l.new_tokens * total);
            let what = format!("case {case}: {l:?} pads {pads:?} window {window:?}");
            for (r, &pad) in pads.iter().enumerate() {
                let is_pad = |k: usize| k >= l.shared && k < l.shared + pad;
                // Real tokens are numbered 0, 1, 2, ... across the shared head and the row's
                // own tokens; pads get 0.
                let real: Vec<usize> = (0..total).filter(|&k| !is_pad(k)).collect();
                for (n, &k) in real.iter().enumerate() {
                    assert_eq!(l.position(k, pad), n, "{what}: row {r} index {k}");
                }
                for k in (0..total).filter(|&k| is_pad(k)) {
                    assert_eq!(l.position(k, pad), 0, "{what}: row {r} pad {k}");
                }
                for t in 0..l.new_tokens {
                    let i = l.past + t;
                    let row = &m[(r * l.new_tokens + t) * total..][..total];
                    assert!(row.iter().all(|&v| v == 0.0 || v == f32::NEG_INFINITY));
                    let seen: Vec<usize> = (0..total).filter(|&j| row[j] == 0.0).collect();
                    let at = format!("{what}: row {r} query {i} sees {seen:?}");
                    assert!(!seen.is_empty(), "{at}");
                    assert!(seen.iter().all(|&j| j <= i), "future key: {at}");
                    if is_pad(i) {
                        assert_eq!(seen, [i], "a padding query sees only itself: {at}");
                    } else {
                        assert!(seen.iter().all(|&j| !is_pad(j)), "padding key: {at}");
                        let pi = l.position(i, pad);
                        let want: Vec<usize> = (0..=i)
                            .filter(|&j| !is_pad(j))
                            .filter(|&j| !matches!(window, Some(w) if pi - l.position(j, pad) >= w))
                            .collect();
                        assert_eq!(seen, want, "{at}");
                    }
                    for (j, &v) in row.iter().enumerate() {
                        assert_eq!(
                            v == 0.0,
                            naive_visible(&l, pad, i, j, window),
                            "{at}: key {j} against the naive rule"
                        );
                    }
                }
            }
        }
    }

    /// Without a window a real query sees every real key up to itself (the full-attention mask
    /// is the windowed one with an unbounded window).
    #[test]
    fn no_window_equals_an_unbounded_window() {
        let mut c = Cases(7);
        for _ in 0..2_000 {
            let (l, pads, _) = layout(&mut c);
            assert_eq!(
                l.additive_mask(&pads, None),
                l.additive_mask(&pads, Some(usize::MAX))
            );
        }
    }
}
