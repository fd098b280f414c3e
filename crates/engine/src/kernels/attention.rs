//! Attention for inference on CPU, one pass per (row, head) in parallel.
//!
//! candle's batched matmul issues one threaded gemm per (row, kv head); at decode time those
//! are thousands of tiny products per token whose thread hand-offs cost more than the work.
//! This kernel computes scores, soft-cap, mask, softmax and the weighted sum in one place.
//! The training path keeps candle's ops (they have a backward pass).

use anyhow::{bail, Result};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;

/// A contiguous f32 view of a CPU tensor, without copying.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            f(&v[start..start + layout.shape().elem_count()])
        }
        _ => bail!("attention kernel: expected an f32 CPU tensor"),
    }
}

/// Dot product with eight independent accumulators so the compiler can vectorise it (a plain
/// iterator sum of f32 must keep its sequential order).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `q: [B, H, T, D]`, `k`/`v: [B, Hkv, S, D]` (H a multiple of Hkv: grouped-query attention),
/// `mask: [B, T, S]` additive (0 or -inf). Returns `[B, H, T, D]`.
///
/// A query row whose every key is masked (-inf) gets zeros, not the NaN of a softmax over
/// nothing. Our own masks never produce such a row (a padding query sees itself), but a
/// caller's mask may. Shapes that disagree are an error, never an out-of-bounds index.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, hkv, s, kd) = k.dims4()?;
    if (kb, kd) != (b, d) || v.dims() != k.dims() {
        bail!(
            "attention kernel: q {:?}, k {:?} and v {:?} disagree (expected [B, H, T, D] and \
             [B, Hkv, S, D] twice)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if hkv == 0 || h % hkv != 0 {
        bail!("attention kernel: {h} query heads are not a multiple of {hkv} key/value heads");
    }
    if mask.len() != b * t * s {
        bail!(
            "attention kernel: mask has {} values, expected B*T*S = {b}*{t}*{s} = {}",
            mask.len(),
            b * t * s
        );
    }
    let g = h / hkv;
    let mut out = vec![0f32; b * h * t * d];
    with_slice(q, |qs| {
        with_slice(k, |ks| {
            with_slice(v, |vs| {
                out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let kvh = hi / g;
                    let kbase = (bi * hkv + kvh) * s * d;
                    let mut p = vec![0f32; s];
                    for ti in 0..t {
                        let qrow = &qs[(bh * t + ti) * d..(bh * t + ti + 1) * d];
                        let mrow = &mask[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                        let mut max = f32::NEG_INFINITY;
                        for si in 0..s {
                            if mrow[si] == f32::NEG_INFINITY {
                                p[si] = f32::NEG_INFINITY;
                                continue;
                            }
                            let krow = &ks[kbase + si * d..kbase + (si + 1) * d];
                            let mut x = dot(qrow, krow) * scale;
                            if let Some(c) = softcap {
                                x = (x / c).tanh() * c;
                            }
                            x += mrow[si];
                            p[si] = x;
                            max = max.max(x);
                        }
                        if max == f32::NEG_INFINITY {
                            // Every key masked: the row stays zero (exp(-inf - -inf) is NaN).
                            continue;
                        }
                        let mut sum = 0f32;
                        for x in p.iter_mut() {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                        let orow = &mut o[ti * d..(ti + 1) * d];
                        for (si, &w) in p.iter().enumerate() {
                            if w == 0.0 {
                                continue;
                            }
                            let w = w / sum;
                            let vrow = &vs[kbase + si * d..kbase + (si + 1) * d];
                            for (oo, vv) in orow.iter_mut().zip(vrow) {
                                *oo += w * vv;
                            }
                        }
                    }
                });
                Ok(())
            })
        })
    })?;
    Ok(Tensor::from_vec(out, (b, h, t, d), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::attention;
    use crate::model::mask::PadLayout;
    use candle_core::{Device, Tensor};

    /// Deterministic values in [-2, 2) (an LCG: no dependency, the same cases every run).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Attention restated with plain loops in f64: query head `hi` reads kv head
    /// `hi / (H / Hkv)`; a row with every key masked is zero.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        (b, h, hkv, t, s, d): (usize, usize, usize, usize, usize, usize),
        scale: f32,
        softcap: Option<f32>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; b * h * t * d];
        for bi in 0..b {
            for hi in 0..h {
                let kvh = hi / (h / hkv);
                for ti in 0..t {
                    let qi = ((bi * h + hi) * t + ti) * d;
                    let mut scores = vec![f64::NEG_INFINITY; s];
                    for (si, sc) in scores.iter_mut().enumerate() {
                        let m = mask[(bi * t + ti) * s + si];
                        if m == f32::NEG_INFINITY {
                            continue;
                        }
                        let ki = ((bi * hkv + kvh) * s + si) * d;
                        let mut x = 0f64;
                        for j in 0..d {
                            x += q[qi + j] as f64 * k[ki + j] as f64;
                        }
                        x *= scale as f64;
                        if let Some(c) = softcap {
                            x = (x / c as f64).tanh() * c as f64;
                        }
                        *sc = x + m as f64;
                    }
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for (si, wi) in w.iter().enumerate() {
                        let vi = ((bi * hkv + kvh) * s + si) * d;
                        for j in 0..d {
                            out[qi + j] += (wi / sum * v[vi + j] as f64) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    /// Runs the kernel and the reference on random q, k, v of the given heads with `mask` of
    /// `b` rows, `t` queries and `s` keys; returns the kernel's output after comparing.
    fn check(
        (b, h, hkv, t, s): (usize, usize, usize, usize, usize),
        mask: &[f32],
        softcap: Option<f32>,
        what: &str,
    ) -> Vec<f32> {
        let d = 8;
        let (q, k, v) = (
            values(b * h * t * d, 1),
            values(b * hkv * s * d, 2),
            values(b * hkv * s * d, 3),
        );
        let dev = &Device::Cpu;
        let out = attention(
            &Tensor::from_slice(&q, (b, h, t, d), dev).unwrap(),
            &Tensor::from_slice(&k, (b, hkv, s, d), dev).unwrap(),
            &Tensor::from_slice(&v, (b, hkv, s, d), dev).unwrap(),
            mask,
            0.35,
            softcap,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let want = naive(&q, &k, &v, mask, (b, h, hkv, t, s, d), 0.35, softcap);
        for (i, (x, y)) in out.iter().zip(&want).enumerate() {
            assert!(
                x.is_finite() && (x - y).abs() < 1e-5,
                "{what}: element {i}: kernel {x}, reference {y}"
            );
        }
        out
    }

    fn layout(shared: usize, past: usize, new_tokens: usize) -> PadLayout {
        PadLayout {
            shared,
            past,
            new_tokens,
        }
    }

    #[test]
    fn grouped_query_heads_match_the_reference() {
        let mask = layout(0, 0, 5).additive_mask(&[0, 0], None);
        for (h, hkv) in [(4, 4), (4, 2), (4, 1)] {
            check((2, h, hkv, 5, 5), &mask, None, &format!("{h}/{hkv} heads"));
        }
    }

    #[test]
    fn soft_cap_matches_the_reference() {
        let mask = layout(0, 2, 4).additive_mask(&[0], None);
        for cap in [1.0, 5.0, 50.0] {
            check(
                (1, 4, 2, 4, 6),
                &mask,
                Some(cap),
                &format!("soft-cap {cap}"),
            );
        }
    }

    #[test]
    fn sliding_window_padding_and_shared_head_match_the_reference() {
        // Rows padded by 0, 2 and 3 tokens after a shared head of 2, with cached positions.
        let l = layout(2, 3, 4);
        let pads = [0, 2, 3];
        for window in [None, Some(1), Some(2), Some(4)] {
            let mask = l.additive_mask(&pads, window);
            check((3, 4, 2, 4, 7), &mask, None, &format!("window {window:?}"));
        }
        // Decoding one token after padded prompts, sliding window and soft-cap together.
        let mask = layout(0, 6, 1).additive_mask(&[0, 4], Some(3));
        check((2, 4, 1, 1, 7), &mask, Some(30.0), "decode step");
    }

    #[test]
    fn a_fully_masked_row_is_zero_not_nan() {
        let (b, t, s) = (2, 3, 4);
        let mut mask = layout(0, 1, 3).additive_mask(&[0, 1], None);
        // Row 1's second query sees nothing.
        mask[(t + 1) * s..(t + 2) * s].fill(f32::NEG_INFINITY);
        let out = check((b, 4, 2, t, s), &mask, None, "masked row");
        let d = 8;
        for hi in 0..4 {
            let at = ((4 + hi) * t + 1) * d;
            assert!(out[at..at + d].iter().all(|&x| x == 0.0), "head {hi}");
        }
    }

    #[test]
    fn a_mask_of_the_wrong_length_is_an_error() {
        let dev = &Device::Cpu;
        let q = Tensor::zeros((2, 4, 3, 8), candle_core::DType::F32, dev).unwrap();
        let kv = Tensor::zeros((2, 2, 5, 8), candle_core::DType::F32, dev).unwrap();
        let e = attention(&q, &kv, &kv, &[0.0; 2 * 3 * 5 - 1], 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mask has 29 values") && e.contains("2*3*5 = 30"),
            "{e}"
        );
        let kv3 = Tensor::zeros((2, 3, 5, 8), candle_core::DType::F32, dev).unwrap();
        let e = attention(&q, &kv3, &kv3, &[0.0; 30], 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple"), "{e}");
    }
}
