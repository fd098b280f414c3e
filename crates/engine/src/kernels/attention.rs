//! Attention for inference on CPU, one pass per (row, head) in parallel.
//!
//! candle's batched matmul issues one threaded gemm per (row, kv head); at decode time those
//! are thousands of tiny products per token whose thread hand-offs cost more than the work.
//! This kernel computes scores, soft-cap, mask, softmax and the weighted sum in one place.
//! The training path keeps candle's ops (they have a backward pass).

#[cfg(target_arch = "x86_64")]
use crate::kernels::attention_rows::{dots16, weighted_rows};
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
    // AVX-512 computes a block of keys at a time (`attention_rows`), to the same bits.
    let blocks = cfg!(target_arch = "x86_64") && matches!(level, Level::Avx512 | Level::Avx512Bf16);
    attention_keys(level, blocks, q, k, v, mask, scale, softcap)
}

/// `attention_at`, with keys a block at a time (`blocks`, AVX-512 levels only) or one by one.
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
    assert!(
        !blocks || matches!(level, Level::Avx512 | Level::Avx512Bf16),
        "key blocks are an AVX-512 path"
    );
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
                            let live = |m: &f32| *m != f32::NEG_INFINITY;
                            let block = &mrow[b0..b0 + n];
                            let lo = b0 + block.iter().position(live).unwrap_or(n);
                            if blocks && lo < b0 + n {
                                let hi = b0 + 1 + block.iter().rposition(live).unwrap_or(0);
                                // SAFETY: `blocks` only on an AVX-512 level the CPU runs.
                                #[cfg(target_arch = "x86_64")]
                                unsafe {
                                    dots16(qrow, &keys[lo * d..hi * d], hi - lo, &mut dots)
                                };
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
                            // SAFETY: as above.
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                weighted_rows(&p, sum, values, orow)
                            };
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
        let (k, pa, pb) = (a.len(), a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= k {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        if i + 8 <= k {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let mut s = hsum256(_mm256_add_ps(s0, s1));
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
mod tests {
    use super::{attention, attention_at, axpy_at, dot_at};
    use crate::kernels::simd::{test_levels, Level};
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

    /// Σ|a·b| over a dot product: f32 rounding of any summation order is a small multiple of
    /// eps times it.
    fn abs_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum()
    }

    #[test]
    fn dot_and_axpy_match_scalar_on_every_level() {
        for level in test_levels("attention dot/axpy") {
            for k in [0, 1, 7, 8, 15, 16, 17, 31, 33, 64, 80, 127, 1000, 4099] {
                let (a, b) = (values(k, 4), values(k, 5));
                let (got, want) = (dot_at(level, &a, &b), dot_at(Level::Scalar, &a, &b));
                let tol = 4.0 * f32::EPSILON * (k as f32).sqrt() * abs_dot(&a, &b);
                assert!(
                    (got - want).abs() <= tol,
                    "{level:?} dot k={k}: {got} vs {want}"
                );
                let (mut o, mut o_ref) = (values(k, 6), values(k, 6));
                axpy_at(level, 0.37, &b, &mut o);
                axpy_at(Level::Scalar, 0.37, &b, &mut o_ref);
                for (i, (x, y)) in o.iter().zip(&o_ref).enumerate() {
                    // FMA rounds once where the scalar path rounds twice.
                    let tol = 2.0 * f32::EPSILON * (y.abs() + (0.37 * b[i]).abs());
                    assert!(
                        (x - y).abs() <= tol,
                        "{level:?} axpy k={k} at {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_matches_scalar_on_every_level() {
        let dev = &Device::Cpu;
        for level in test_levels("attention") {
            // Head widths with and without vector tails; 1-4 query rows; a long cache.
            for (d, t, s) in [
                (7, 1, 5),
                (17, 3, 9),
                (64, 4, 300),
                (80, 2, 33),
                (131, 1, 70),
            ] {
                let (b, h, hkv) = (2, 4, 2);
                let mask = layout(0, s - t, t).additive_mask(&[0, 1], Some(s - 2));
                let q = Tensor::from_vec(values(b * h * t * d, 7), (b, h, t, d), dev).unwrap();
                let k = Tensor::from_vec(values(b * hkv * s * d, 8), (b, hkv, s, d), dev).unwrap();
                let v = Tensor::from_vec(values(b * hkv * s * d, 9), (b, hkv, s, d), dev).unwrap();
                let run = |l| {
                    let o = attention_at(l, &q, &k, &v, &mask, 0.125, Some(30.0)).unwrap();
                    o.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                let (got, want) = (run(level), run(Level::Scalar));
                for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{level:?} d={d} t={t} s={s} at {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The AVX-512 key blocks give the one-key path's output to the bit: padding and causal
    /// masks that leave blocks partly or wholly masked, sliding windows, soft-caps, head widths
    /// with and without tails, caches shorter and longer than a block.
    #[test]
    fn key_blocks_equal_one_key_at_a_time() {
        let dev = &Device::Cpu;
        for level in test_levels("attention key blocks") {
            if !matches!(level, Level::Avx512 | Level::Avx512Bf16) {
                continue;
            }
            for (d, t, s, shared, window, cap) in [
                (64, 1, 5, 0, None, None),
                (64, 12, 36, 24, None, None),
                (64, 1, 300, 0, Some(40), None),
                (80, 3, 33, 0, None, Some(30.0)),
                (131, 2, 70, 16, Some(20), Some(50.0)),
                (7, 5, 17, 0, None, None),
            ] {
                let (b, h, hkv) = (3, 6, 2);
                let mask = layout(shared, s - t, t).additive_mask(&[0, 3, 17], window);
                let q = Tensor::from_vec(values(b * h * t * d, 1), (b, h, t, d), dev).unwrap();
                let k = Tensor::from_vec(values(b * hkv * s * d, 2), (b, hkv, s, d), dev).unwrap();
                let v = Tensor::from_vec(values(b * hkv * s * d, 3), (b, hkv, s, d), dev).unwrap();
                let run = |blocks| {
                    let o = super::attention_keys(level, blocks, &q, &k, &v, &mask, 0.125, cap);
                    let o = o.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(run(true), run(false), "{level:?} d={d} t={t} s={s}");
            }
        }
    }

    /// Keys and values read as the first S positions of longer buffers (the KV cache's views)
    /// give the contiguous copies' output to the bit, on every level; a layout that is not
    /// evenly spaced (a transposed view) is copied first and gives it too.
    #[test]
    fn views_of_longer_buffers_are_read_in_place() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (b, h, hkv, t, s, d, room) = (2, 4, 2, 3, 5, 8, 4);
        let q = Tensor::from_vec(values(b * h * t * d, 1), (b, h, t, d), &dev)?;
        let kb = Tensor::from_vec(
            values(b * hkv * (s + room) * d, 2),
            (b, hkv, s + room, d),
            &dev,
        )?;
        let vb = Tensor::from_vec(
            values(b * hkv * (s + room) * d, 3),
            (b, hkv, s + room, d),
            &dev,
        )?;
        let (k, v) = (kb.narrow(2, 0, s)?, vb.narrow(2, 0, s)?);
        assert!(!k.is_contiguous());
        let mask = vec![0f32; b * t * s];
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        for level in test_levels("attention") {
            let want = attention_at(
                level,
                &q,
                &k.contiguous()?,
                &v.contiguous()?,
                &mask,
                0.3,
                None,
            )?;
            let got = attention_at(level, &q, &k, &v, &mask, 0.3, None)?;
            assert_eq!(flat(&got)?, flat(&want)?, "{level:?}");
            let kt = k
                .contiguous()?
                .transpose(2, 3)?
                .contiguous()?
                .transpose(2, 3)?;
            let odd = attention_at(level, &q, &kt, &v, &mask, 0.3, None)?;
            assert_eq!(flat(&odd)?, flat(&want)?, "{level:?}: transposed keys");
        }
        Ok(())
    }
}
