//! `x · wᵀ` with f32 activations and GGUF-quantized weights that stay quantized in memory.
//!
//! Two paths, by the number of activation rows:
//! - a handful (a single sequence's decode step): as llama.cpp does, each activation row is
//!   quantized once to the weight type's dot-product partner (Q8_0, Q8_1 or Q8_K) and integer
//!   dot products come from candle's k-quants (`GgmlType::vec_dot_4`, SIMD where the CPU has it;
//!   our own AVX2 and AVX-512 ones for Q4_1, chosen by `simd`). Reading the weight once is all
//!   that matters here.
//! - more (batched decode, prompts): weight rows are dequantized a few at a time (or a panel at
//!   a time) and go through the f32 kernels of `widen`; dequantizing a row costs K operations
//!   and is shared by every activation row, and the products are then exact f32 ones.
//!
//! candle's own quantized matmul runs on its spin-waiting barrier pool, which the CLI pins to
//! one thread; these run on rayon.

use crate::kernels::matmul_small::{over_tiles, WeightRows};
use crate::kernels::simd::{self, Level};
use crate::kernels::widen::matmul_rows;
use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

/// Whether the kernels can run a weight of this type (else `--dtype f32` dequantizes it).
pub fn supported(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        t,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// Up to this many activation rows use integer dot products; beyond, dequantized rows.
pub const INT_ROWS: usize = 4;

/// `x: [M, K]` f32, `w: [N, K]` quantized: `[M, N]` f32.
pub fn matmul(x: &[f32], m: usize, k: usize, w: &QTensor) -> Result<Vec<f32>> {
    let (n, k2) = w.shape().dims2()?;
    if k != k2 {
        bail!("quantized matmul: inner dimensions {k} and {k2} differ");
    }
    let data = w.data()?;
    use GgmlDType::*;
    match w.dtype() {
        Q4_0 => typed::<BlockQ4_0>(x, m, k, &data, n),
        Q4_1 => typed::<BlockQ4_1>(x, m, k, &data, n),
        Q5_0 => typed::<BlockQ5_0>(x, m, k, &data, n),
        Q5_1 => typed::<BlockQ5_1>(x, m, k, &data, n),
        Q8_0 => typed::<BlockQ8_0>(x, m, k, &data, n),
        Q2K => typed::<BlockQ2K>(x, m, k, &data, n),
        Q3K => typed::<BlockQ3K>(x, m, k, &data, n),
        Q4K => typed::<BlockQ4K>(x, m, k, &data, n),
        Q5K => typed::<BlockQ5K>(x, m, k, &data, n),
        Q6K => typed::<BlockQ6K>(x, m, k, &data, n),
        other => bail!(
            "quantized matmul: no kernel for {}",
            crate::model::weight::quant_name(other)
        ),
    }
}

/// `[M, N]` for blocks of type `T`, by the path the row count calls for.
fn typed<T: GgmlType>(x: &[f32], m: usize, k: usize, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let w = blocks::<T>(k, bytes, n)?;
    let kb = k / T::BLCK_SIZE;
    if m > INT_ROWS {
        let fast = crate::kernels::dequant::Widen::new(T::DTYPE, simd::level());
        let rows = QuantRows { w, bytes, kb, fast };
        return Ok(matmul_rows(x, m, k, n, &rows));
    }
    Ok(match simd::level() {
        level @ (Level::Avx2 | Level::Avx512 | Level::Avx512Bf16)
            if T::DTYPE == GgmlDType::Q4_1 =>
        {
            q4_1::run(level, x, m, k, bytes, n)
        }
        _ => int_dots::<T>(x, m, k, w, n),
    })
}

/// Weight rows dequantized on the fly: by `dequant`'s kernel for the type where it has one
/// (the same values), else by candle's `to_float`.
struct QuantRows<'a, T> {
    w: &'a [T],
    bytes: &'a [u8],
    kb: usize,
    fast: Option<crate::kernels::dequant::Widen>,
}

impl<T: GgmlType> WeightRows for QuantRows<'_, T> {
    const WIDENS: bool = true;
    fn widen(&self, j: usize, out: &mut [f32]) {
        match &self.fast {
            Some(f) => {
                let row = self.kb * std::mem::size_of::<T>();
                f.run(&self.bytes[j * row..(j + 1) * row], out)
            }
            None => T::to_float(&self.w[j * self.kb..(j + 1) * self.kb], out),
        }
    }
}

/// The weight's bytes as blocks of `T`, checked.
fn blocks<T: GgmlType>(k: usize, bytes: &[u8], n: usize) -> Result<&[T]> {
    if !k.is_multiple_of(T::BLCK_SIZE) {
        bail!("quantized matmul: row length {k} is not a multiple of the block size");
    }
    let kb = k / T::BLCK_SIZE;
    let size = std::mem::size_of::<T>();
    if bytes.len() != n * kb * size {
        bail!(
            "quantized matmul: {} bytes of weights, expected {} for [{n}, {k}]",
            bytes.len(),
            n * kb * size
        );
    }
    if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        bail!("quantized matmul: weight storage is not aligned for its block type");
    }
    // SAFETY: the bytes are candle's own `Vec<T>` storage of this block type (length and
    // alignment checked above); blocks are plain data (`repr(C)` numbers), valid for any bits.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n * kb) })
}

/// Each activation row quantized to `V` (the weight type's dot-product partner), as llama.cpp
/// quantizes them: `[M, K / block]`.
fn quantize_rows<V: GgmlType>(x: &[f32], k: usize) -> Vec<V> {
    let kb = k / V::BLCK_SIZE;
    let mut xq = vec![V::zeros(); x.len() / k * kb];
    xq.par_chunks_mut(kb)
        .zip(x.par_chunks(k))
        .for_each(|(q, row)| V::from_float(row, q));
    xq
}

/// `[M, N]`: `dot(j, take, i)` gives weight rows j..j+take (take <= 4) dotted with activation
/// row i, on `matmul_small`'s loop (one task per 16 weight rows, which stay in cache while every
/// activation row passes).
fn by_row_quads(
    n: usize,
    m: usize,
    dot: impl Fn(usize, usize, usize) -> [f32; 4] + Sync,
) -> Vec<f32> {
    over_tiles(
        m,
        n,
        2,
        || (),
        |_, _, _| {},
        |_, j, take, i, nx| {
            let mut t = [[0f32; 4]; 4];
            for (a, row) in t.iter_mut().enumerate().take(nx) {
                *row = dot(j, take, i + a);
            }
            t
        },
    )
}

/// `[M, N]` by candle's integer dot products (SIMD where candle has them).
fn int_dots<T: GgmlType>(x: &[f32], m: usize, k: usize, w: &[T], n: usize) -> Vec<f32> {
    let kb = k / T::BLCK_SIZE;
    let xq = quantize_rows::<T::VecDotType>(x, k);
    let wrow = |j: usize| &w[j * kb..(j + 1) * kb];
    by_row_quads(n, m, |j, take, i| {
        let xr = &xq[i * kb..(i + 1) * kb];
        if take == 4 {
            let d = T::vec_dot_4(k, wrow(j), wrow(j + 1), wrow(j + 2), wrow(j + 3), xr);
            return [d.0, d.1, d.2, d.3];
        }
        let mut d = [0f32; 4];
        for (q, v) in d.iter_mut().enumerate().take(take) {
            *v = T::vec_dot(k, wrow(j + q), xr);
        }
        d
    })
}

/// Q4_1 weights: candle has no SIMD dot product for them on x86 (its scalar fallback made a
/// SmolLM2 Q4_1 run 9x slower than f32), so this is llama.cpp's AVX2 formulation of
/// `vec_dot_q4_1_q8_1` over the raw blocks, and an AVX-512 one taking two blocks per step.
/// Activations are quantized by candle's `BlockQ8_1`, as llama.cpp quantizes them. Candle's
/// scalar `vec_dot` is the reference (`Level::Scalar`).
mod q4_1 {
    use crate::kernels::simd::Level;
    use candle_core::quantized::k_quants::BlockQ8_1;

    /// Bytes of one block: d (f16), m (f16), 16 bytes of nibbles (low: values 0-15, high: 16-31).
    const W: usize = 20;
    /// Bytes of one activation block: d (f16), s = d·Σq (f16), 32 signed bytes.
    const X: usize = 36;

    /// `[M, N]`, as `super::int_dots` (the caller checked the bytes as Q4_1 blocks), on
    /// `level` (AVX2 or AVX-512, one the CPU runs).
    pub fn run(level: Level, x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
        let kb = k / 32;
        let xq = super::quantize_rows::<BlockQ8_1>(x, k);
        const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == X);
        // SAFETY: BlockQ8_1 is `repr(C)` {f16, f16, [i8; 32]}, 36 bytes with no padding.
        let xb: &[u8] = unsafe { std::slice::from_raw_parts(xq.as_ptr() as *const u8, m * kb * X) };
        let row_bytes = kb * W;
        let wrow = |j: usize| &w[j * row_bytes..(j + 1) * row_bytes];
        super::by_row_quads(n, m, |j, take, i| {
            let xr = &xb[i * kb * X..(i + 1) * kb * X];
            // Rows past `take` repeat the last one; their results are not written.
            let ws = [0, 1, 2, 3].map(|q| wrow(j + q.min(take - 1)));
            // SAFETY: the caller's level is one the CPU runs; lengths match kb.
            match level {
                Level::Avx512 | Level::Avx512Bf16 => unsafe { dot4_avx512(ws, xr, kb) },
                Level::Avx2 => unsafe { dot4_avx2(ws, xr, kb) },
                _ => unreachable!("Q4_1 has no {level:?} kernel of its own"),
            }
        })
    }

    /// The two f16 numbers at `at` (a block's d and m, or d and s), widened in one instruction
    /// (half's per-value conversion was a tenth of a decode step).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "f16c")]
    unsafe fn two_f16(b: &[u8], at: usize) -> (f32, f32) {
        use std::arch::x86_64::*;
        let bits = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), v);
        (out[0], out[1])
    }

    /// One block's products as 8 f32 sums (still to be scaled by d_w·d_x): the 16 nibble bytes
    /// at `w[wo..]` against the 32 signed bytes at `x[xo..]`.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_sums(w: &[u8], wo: usize, x: &[u8], xo: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let qx = _mm256_loadu_si256(x.as_ptr().add(xo + 4) as *const __m256i);
        let raw = _mm_loadu_si128(w.as_ptr().add(wo + 4) as *const __m128i);
        // Low nibbles are values 0-15, high nibbles 16-31: one 32-byte vector of 0..15.
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        let qw = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
        let pairs = _mm256_maddubs_epi16(qw, qx);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Four weight rows against one activation row, `kb` blocks each.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4_avx2(w: [&[u8]; 4], x: &[u8], kb: usize) -> [f32; 4] {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        for b in 0..kb {
            let xo = b * X;
            let (dx, sx) = two_f16(x, xo);
            for r in 0..4 {
                let wo = b * W;
                let (dw, mw) = two_f16(w[r], wo);
                summs[r] += mw * sx;
                let sums = block_sums(w[r], wo, x, xo);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), sums, acc[r]);
            }
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            out[r] = crate::kernels::attention::x86::hsum256(acc[r]) + summs[r];
        }
        out
    }

    /// As `dot4_avx2`, two blocks per 512-bit step (each block's scale on its half of the
    /// lanes); an odd last block takes the 256-bit step.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn dot4_avx512(w: [&[u8]; 4], x: &[u8], kb: usize) -> [f32; 4] {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut tail = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        let low = _mm512_set1_epi8(0x0F);
        let ones = _mm512_set1_epi16(1);
        let mut b = 0;
        while b + 2 <= kb {
            let (xo0, xo1) = (b * X, (b + 1) * X);
            let ((dx0, sx0), (dx1, sx1)) = (two_f16(x, xo0), two_f16(x, xo1));
            let qx = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(x.as_ptr().add(xo0 + 4) as *const _)),
                _mm256_loadu_si256(x.as_ptr().add(xo1 + 4) as *const _),
            );
            for r in 0..4 {
                let (wo0, wo1) = (b * W, (b + 1) * W);
                let ((dw0, mw0), (dw1, mw1)) = (two_f16(w[r], wo0), two_f16(w[r], wo1));
                summs[r] += mw0 * sx0 + mw1 * sx1;
                let raw0 = _mm_loadu_si128(w[r].as_ptr().add(wo0 + 4) as *const __m128i);
                let raw1 = _mm_loadu_si128(w[r].as_ptr().add(wo1 + 4) as *const __m128i);
                let both = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_set_m128i(_mm_srli_epi16(raw0, 4), raw0)),
                    _mm256_set_m128i(_mm_srli_epi16(raw1, 4), raw1),
                );
                let qw = _mm512_and_si512(both, low);
                let pairs = _mm512_maddubs_epi16(qw, qx);
                let sums = _mm512_cvtepi32_ps(_mm512_madd_epi16(pairs, ones));
                // Lanes 0-7 hold block b's sums, 8-15 block b+1's.
                let scale = _mm512_mask_blend_ps(
                    0xFF00,
                    _mm512_set1_ps(dw0 * dx0),
                    _mm512_set1_ps(dw1 * dx1),
                );
                acc[r] = _mm512_fmadd_ps(scale, sums, acc[r]);
            }
            b += 2;
        }
        if b < kb {
            let xo = b * X;
            let (dx, sx) = two_f16(x, xo);
            for r in 0..4 {
                let wo = b * W;
                let (dw, mw) = two_f16(w[r], wo);
                summs[r] += mw * sx;
                let sums = block_sums(w[r], wo, x, xo);
                tail[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), sums, tail[r]);
            }
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            out[r] = _mm512_reduce_add_ps(acc[r])
                + crate::kernels::attention::x86::hsum256(tail[r])
                + summs[r];
        }
        out
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn dot4_avx2(_w: [&[u8]; 4], _x: &[u8], _kb: usize) -> [f32; 4] {
        unreachable!("the AVX2 level exists only on x86_64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn dot4_avx512(_w: [&[u8]; 4], _x: &[u8], _kb: usize) -> [f32; 4] {
        unreachable!("the AVX-512 level exists only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use candle_core::{Device, Tensor};

    /// Every type, both paths: few rows against candle's own quantized matmul (the llama.cpp
    /// algorithm, activations quantized the same way) and near the exact product; more rows
    /// equal to the f32 product of the dequantized weight.
    #[test]
    fn both_paths_for_every_type() {
        use GgmlDType::*;
        for t in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
            let k = 512;
            for (m, n) in [
                (1, 9),
                (INT_ROWS, 37),
                (INT_ROWS + 1, 37),
                (40, 64),
                (70, 33),
            ] {
                let w = Tensor::from_vec(pseudo(n * k, 2), (n, k), &Device::Cpu).unwrap();
                let q = std::sync::Arc::new(QTensor::quantize(&w, t).unwrap());
                let xv = pseudo(m * k, 3);
                let got = matmul(&xv, m, k, &q).unwrap();
                let x = Tensor::from_vec(xv, (m, k), &Device::Cpu).unwrap();
                let deq = q.dequantize(&Device::Cpu).unwrap();
                let exact = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap();
                let exact = exact.to_vec1::<f32>().unwrap();
                if m > INT_ROWS {
                    for (g, e) in got.iter().zip(&exact) {
                        let tol = 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt();
                        assert!((g - e).abs() <= tol, "{t:?} {m}x{n}: {g} vs exact {e}");
                    }
                    continue;
                }
                use candle_core::Module;
                let qm = candle_core::quantized::QMatMul::from_arc(q.clone()).unwrap();
                let want = qm.forward(&x).unwrap().flatten_all().unwrap();
                let want = want.to_vec1::<f32>().unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{t:?}: {g} vs {e}");
                }
                let scale = exact.iter().map(|v| v.abs()).fold(0f32, f32::max);
                for (g, e) in got.iter().zip(&exact) {
                    // 8-bit activations: about 1% of the largest output.
                    assert!((g - e).abs() <= 0.02 * scale, "{t:?}: {g} vs exact {e}");
                }
            }
        }
    }

    /// The Q4_1 kernels on every level this CPU runs against candle's scalar `vec_dot` (the
    /// same integer products; only the f32 accumulation order differs).
    #[test]
    fn q4_1_levels_match_candle_scalar() {
        use candle_core::quantized::k_quants::BlockQ4_1;
        for level in crate::kernels::simd::test_levels("Q4_1 dot") {
            if !matches!(level, Level::Avx2 | Level::Avx512 | Level::Avx512Bf16) {
                continue; // the reference itself, or a level `typed` never sends here (NEON)
            }
            // Odd and even block counts (the AVX-512 path takes blocks in pairs), a long row.
            for (m, n, kb) in [(1, 1, 1), (2, 5, 2), (3, 9, 3), (4, 37, 16), (4, 6, 129)] {
                let k = 32 * kb;
                let w = Tensor::from_vec(pseudo(n * k, 9), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
                let bytes = q.data().unwrap();
                let xv = pseudo(m * k, 10);
                let got = q4_1::run(level, &xv, m, k, &bytes, n);
                let blocks = blocks::<BlockQ4_1>(k, &bytes, n).unwrap();
                let want = int_dots::<BlockQ4_1>(&xv, m, k, blocks, n);
                let scale = want.iter().map(|v| v.abs()).fold(1f32, f32::max);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * scale * (kb as f32).sqrt(),
                        "{level:?} {m}x{n}x{k} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
