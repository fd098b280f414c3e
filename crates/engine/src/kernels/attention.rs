//! Attention for inference on CPU, one pass per (row, head) in parallel.
//!
//! candle's batched matmul issues one threaded gemm per (row, kv head); at decode time those
//! are thousands of tiny products per token whose thread hand-offs cost more than the work.
//! This kernel computes scores, soft-cap, mask, softmax and the weighted sum in one place.
//! The training path keeps candle's ops (they have a backward pass).

#[cfg(target_arch = "x86_64")]
use crate::kernels::attention_rows::{dots16, dots16_avx2, weighted_rows, weighted_rows_avx2};
use crate::kernels::simd::{self, Level};
use anyhow::{bail, ensure, Result};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;

/// `t: [B, H, S, D]` in place when its positions are rows of D and its heads are evenly spaced
/// (contiguous, or the first S positions of a longer buffer, as the KV cache keeps them):
/// `f(values from the first, head stride)`. Anything else is copied contiguous first.
pub(crate) fn with_heads<R>(t: &Tensor, f: impl FnOnce(&[f32], usize) -> Result<R>) -> Result<R> {
    let (_, h, s, d) = t.dims4()?;
    let st = t.stride();
    let spaced = st[3] == 1 && st[2] == d && st[0] == h * st[1] && st[1] >= s * d;
    let t = if spaced { t.clone() } else { t.contiguous()? };
    let head = t.stride()[1];
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            let (b, _, _, _) = t.dims4()?;
            // The last head's S positions end the tensor's reach.
            let end = start + (b * h - 1) * head + s * d;
            ensure!(
                end <= v.len(),
                "attention kernel: a tensor's view overruns its storage"
            );
            f(&v[start..end], head)
        }
        _ => bail!("attention kernel: expected an f32 CPU tensor"),
    }
}

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

/// `a · b` on the process's SIMD level (see `simd`).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_at(simd::level(), a, b)
}

/// `a · b` on a given level (a hot loop reads the level once; tests force each one).
#[inline]
pub(crate) fn dot_at(level: Level, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let k = a.len().min(b.len());
    let (a, b) = (&a[..k], &b[..k]);
    match level {
        // SAFETY: `level` is only ever a level the CPU runs (simd::choice, simd::test_levels).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx512Bf16 => unsafe { x86::dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dot_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { arm::dot_neon(a, b) },
        _ => dot_scalar(a, b),
    }
}

/// The reference: eight independent accumulators so the compiler can vectorise it for the
/// baseline target (a plain iterator sum of f32 must keep its sequential order).
#[inline]
pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
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

/// `o += w · v` (the softmax-weighted sum of value rows) on a given level.
#[inline]
pub(crate) fn axpy_at(level: Level, w: f32, v: &[f32], o: &mut [f32]) {
    debug_assert_eq!(v.len(), o.len());
    let k = v.len().min(o.len());
    let (v, o) = (&v[..k], &mut o[..k]);
    match level {
        // SAFETY: as in `dot_at`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx512Bf16 => unsafe { x86::axpy_avx512(w, v, o) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::axpy_avx2(w, v, o) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { arm::axpy_neon(w, v, o) },
        _ => {
            for (oo, vv) in o.iter_mut().zip(v) {
                *oo += w * vv;
            }
        }
    }
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
    attention_at(simd::level(), q, k, v, mask, scale, softcap)
}

/// `attention` on a given SIMD level.
pub(crate) fn attention_at(
    level: Level,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    attention_keys(level, takes_blocks(level), q, k, v, mask, scale, softcap)
}

/// Whether `level` computes a block of keys at a time (`attention_rows`, to the same bits as
/// one key at a time): the AVX-512 and AVX2 levels.
fn takes_blocks(level: Level) -> bool {
    cfg!(target_arch = "x86_64") && matches!(level, Level::Avx512 | Level::Avx512Bf16 | Level::Avx2)
}

/// The scores of a block of keys (`attention_rows::dots16` and `dots16_avx2`). Only the x86
/// levels take blocks (`attention_keys` asserts it), so the level's features are present.
fn key_block(level: Level, q: &[f32], keys: &[f32], n: usize, out: &mut [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: blocks are taken on an x86 level the CPU runs (see above).
    unsafe {
        match level {
            Level::Avx2 => dots16_avx2(q, keys, n, out),
            _ => dots16(q, keys, n, out),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, q, keys, n, out);
        unreachable!("key blocks are an x86 path");
    }
}

/// The weighted sum of a query's value rows (`attention_rows::weighted_rows`), as `key_block`.
fn block_sum(level: Level, p: &[f32], sum: f32, values: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `key_block`.
    unsafe {
        match level {
            Level::Avx2 => weighted_rows_avx2(p, sum, values, o),
            _ => weighted_rows(p, sum, values, o),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, p, sum, values, o);
        unreachable!("key blocks are an x86 path");
    }
}

/// `attention_at`, with keys a block at a time (`blocks`, x86 levels only) or one by one.
#[allow(clippy::too_many_arguments)]
fn attention_keys(
    level: Level,
    blocks: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    assert!(!blocks || takes_blocks(level), "key blocks are an x86 path");
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
        with_heads(k, |ks, kstride| {
            with_heads(v, |vs, vstride| {
                out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let kvh = hi / g;
                    let kbase = (bi * hkv + kvh) * kstride;
                    let vbase = (bi * hkv + kvh) * vstride;
                    let mut p = vec![0f32; s];
                    for ti in 0..t {
                        let qrow = &qs[(bh * t + ti) * d..(bh * t + ti + 1) * d];
                        let mrow = &mask[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                        let mut max = f32::NEG_INFINITY;
                        let keys = &ks[kbase..kbase + s * d];
                        let mut dots = [0f32; 16];
                        for b0 in (0..s).step_by(16) {
                            let n = (s - b0).min(16);
                            // The block's scores from its first unmasked key to its last (a
                            // causal or padding mask leaves the rest of a block masked).
                            let mut lo = b0;
                            if blocks {
                                let live = |m: &f32| *m != f32::NEG_INFINITY;
                                let block = &mrow[b0..b0 + n];
                                lo += block.iter().position(live).unwrap_or(n);
                                if lo < b0 + n {
                                    let hi = b0 + 1 + block.iter().rposition(live).unwrap_or(0);
                                    key_block(
                                        level,
                                        qrow,
                                        &keys[lo * d..hi * d],
                                        hi - lo,
                                        &mut dots,
                                    );
                                }
                            }
                            for si in b0..b0 + n {
                                if mrow[si] == f32::NEG_INFINITY {
                                    p[si] = f32::NEG_INFINITY;
                                    continue;
                                }
                                let mut x = if blocks {
                                    dots[si - lo]
                                } else {
                                    dot_at(level, qrow, &keys[si * d..(si + 1) * d])
                                } * scale;
                                if let Some(c) = softcap {
                                    x = (x / c).tanh() * c;
                                }
                                x += mrow[si];
                                p[si] = x;
                                max = max.max(x);
                            }
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
                        let values = &vs[vbase..vbase + s * d];
                        if blocks {
                            block_sum(level, &p, sum, values, orow);
                            continue;
                        }
                        for (si, &w) in p.iter().enumerate() {
                            if w == 0.0 {
                                continue;
                            }
                            axpy_at(level, w / sum, &values[si * d..(si + 1) * d], orow);
                        }
                    }
                });
                Ok(())
            })
        })
    })?;
    Ok(Tensor::from_vec(out, (b, h, t, d), q.device())?)
}

/// The x86 paths: two accumulators of a vector each, so consecutive FMAs do not wait on each
/// other; AVX-512 finishes a row's tail with a masked load instead of scalar code.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Caller: AVX2 and FMA present, `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let k = a.len().min(b.len());
        let (lanes, i) = crate::kernels::attention_rows::dot_lanes_avx2(a.as_ptr(), b.as_ptr(), k);
        let mut s = hsum256(lanes);
        for t in i..k {
            s += a[t] * b[t];
        }
        s
    }

    /// Lanes `0..n` (n < 16) set: the tail of a row, loaded without reading past it.
    #[inline]
    pub(crate) fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Caller: AVX-512F present, `a.len() == b.len()`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let k = a.len().min(b.len());
        _mm512_reduce_add_ps(crate::kernels::attention_rows::dot_lanes(
            a.as_ptr(),
            b.as_ptr(),
            k,
        ))
    }

    /// Caller: AVX2 and FMA present, `v.len() == o.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn axpy_avx2(w: f32, v: &[f32], o: &mut [f32]) {
        let (k, pv, po) = (v.len(), v.as_ptr(), o.as_mut_ptr());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= k {
            let r = _mm256_fmadd_ps(wv, _mm256_loadu_ps(pv.add(i)), _mm256_loadu_ps(po.add(i)));
            _mm256_storeu_ps(po.add(i), r);
            i += 8;
        }
        for t in i..k {
            o[t] += w * v[t];
        }
    }

    /// Caller: AVX-512F present, `v.len() == o.len()`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn axpy_avx512(w: f32, v: &[f32], o: &mut [f32]) {
        let (k, pv, po) = (v.len(), v.as_ptr(), o.as_mut_ptr());
        let wv = _mm512_set1_ps(w);
        let mut i = 0;
        while i + 16 <= k {
            let r = _mm512_fmadd_ps(wv, _mm512_loadu_ps(pv.add(i)), _mm512_loadu_ps(po.add(i)));
            _mm512_storeu_ps(po.add(i), r);
            i += 16;
        }
        if i < k {
            let m = tail_mask(k - i);
            let r = _mm512_fmadd_ps(
                wv,
                _mm512_maskz_loadu_ps(m, pv.add(i)),
                _mm512_maskz_loadu_ps(m, po.add(i)),
            );
            _mm512_mask_storeu_ps(po.add(i), m, r);
        }
    }
}

/// The aarch64 paths (Advanced SIMD is part of the aarch64 baseline).
#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    use std::arch::aarch64::*;

    /// Caller: `a.len() == b.len()`.
    pub(crate) unsafe fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
        let (k, pa, pb) = (a.len(), a.as_ptr(), b.as_ptr());
        let mut s = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= k {
            for (j, acc) in s.iter_mut().enumerate() {
                let at = i + 4 * j;
                *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(at)), vld1q_f32(pb.add(at)));
            }
            i += 16;
        }
        while i + 4 <= k {
            s[0] = vfmaq_f32(s[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            i += 4;
        }
        let mut r = vaddvq_f32(vaddq_f32(vaddq_f32(s[0], s[1]), vaddq_f32(s[2], s[3])));
        for t in i..k {
            r += a[t] * b[t];
        }
        r
    }

    /// Caller: `v.len() == o.len()`.
    pub(crate) unsafe fn axpy_neon(w: f32, v: &[f32], o: &mut [f32]) {
        let (k, pv, po) = (v.len(), v.as_ptr(), o.as_mut_ptr());
        let wv = vdupq_n_f32(w);
        let mut i = 0;
        while i + 4 <= k {
            vst1q_f32(
                po.add(i),
                vfmaq_f32(vld1q_f32(po.add(i)), wv, vld1q_f32(pv.add(i))),
            );
            i += 4;
        }
        for t in i..k {
            o[t] += w * v[t];
        }
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
