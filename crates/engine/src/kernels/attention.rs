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

/// `q: [B, H, T, D]`, `k`/`v: [B, Hkv, S, D]`, `mask: [B, T, S]` additive (0 or -inf).
/// Returns `[B, H, T, D]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
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
