//! The decode-step kernel on bf16 weights read in place, two ways.
//!
//! - `Avx512`, `Avx2`: each weight vector is widened in registers (a bf16 is the top half of an
//!   f32, so widening is a zero-extend and a shift) and multiplied with the f32 activations. The
//!   sums are the ones `matmul_small` computes on the same rows widened into a buffer, in the
//!   same order, without the buffer's extra pass through L1.
//! - `Avx512Bf16`: `vdpbf16ps`, one instruction for 32 bf16 products summed in pairs into 16 f32
//!   lanes, twice the multiply-adds of an f32 FMA and no widening. It needs the activations in
//!   bf16 too: they are rounded to nearest-even once per call. That rounding is the price (the
//!   results are no longer those of f32 math on the bf16 weights), so the level is only taken
//!   when asked for (`SAFETY_LAYERS_SIMD=avx512bf16`; see `simd`). The instruction also treats
//!   subnormal inputs and outputs as zero.
//!
//! Other levels return None and the caller widens rows into a buffer (`widen`).

use crate::kernels::simd::Level;
use half::bf16;

/// `x: [M, K]` f32 against bf16 weight rows `w: [N, K]`: `[M, N]` (as
/// `matmul_small::small_rows`), or None when `level` has no in-place kernel.
pub(crate) fn small_rows_bf16(
    level: Level,
    x: &[f32],
    w: &[bf16],
    m: usize,
    n: usize,
    k: usize,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    return x86_rows(level, x, w, m, n, k);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, x, w, m, n, k);
        None
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_rows(level: Level, x: &[f32], w: &[bf16], m: usize, n: usize, k: usize) -> Option<Vec<f32>> {
    use crate::kernels::matmul_small::{input_rows, over_tiles, x_rows};
    use half::slice::HalfFloatSliceExt;
    let rows = |j: usize, nw: usize| -> [&[bf16]; 4] {
        // A partial quad repeats its last row: the kernel computes it twice, the caller keeps one.
        std::array::from_fn(|q| {
            let r = j + q.min(nw - 1);
            &w[r * k..(r + 1) * k]
        })
    };
    // The input pair's ranges; a lone last row is paired with itself, as in `matmul_small`.
    let pair = |i: usize, nx: usize| [i * k..(i + 1) * k, (i + nx - 1) * k..(i + nx) * k];
    match level {
        Level::Avx512 | Level::Avx2 => Some(over_tiles(
            m,
            n,
            x_rows(level),
            || (),
            |_, _, _| {},
            |_, j, nw, i, nx| {
                let (xs, ws) = (input_rows(x, k, i, nx), rows(j, nw));
                let mut t = [[0f32; 4]; 4];
                // SAFETY: the level is one the CPU runs (simd::choice, simd::test_levels);
                // every row has length k.
                unsafe {
                    match level {
                        Level::Avx512 if nx > 2 => t = x86::widen_rx4_avx512(xs, ws),
                        Level::Avx512 => {
                            t[..2].copy_from_slice(&x86::widen_rx4_avx512([xs[0], xs[1]], ws))
                        }
                        _ => t[..2].copy_from_slice(&x86::widen_2x4_avx2(xs[0], xs[1], ws)),
                    }
                }
                t
            },
        )),
        Level::Avx512Bf16 => {
            let mut xb = vec![bf16::ZERO; x.len()];
            xb.convert_from_f32_slice(x);
            Some(over_tiles(
                m,
                n,
                2,
                || (),
                |_, _, _| {},
                |_, j, nw, i, nx| {
                    let [r0, r1] = pair(i, nx);
                    let mut t = [[0f32; 4]; 4];
                    // SAFETY: as above, and the CPU has AVX-512 BF16 (Cpu::runs).
                    t[..2].copy_from_slice(&unsafe {
                        x86::dot_2x4_avx512bf16(&xb[r0], &xb[r1], rows(j, nw))
                    });
                    t
                },
            ))
        }
        _ => None,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::matmul_small::x86 as tiles;
    use half::bf16;
    use std::arch::x86_64::*;

    /// R input rows (2 or 4) against four bf16 weight rows, widened 16 at a time: the sums of
    /// `matmul_small`'s AVX-512 tiles on the widened rows, in their order (their loop).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn widen_rx4_avx512<const R: usize>(
        x: [&[f32]; R],
        w: [&[bf16]; 4],
    ) -> [[f32; 4]; R] {
        tiles::tile_rx4_avx512_by(
            x,
            |c, i, m| {
                let h = _mm256_maskz_loadu_epi16(m, w[c].as_ptr().add(i) as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            },
            |_| {},
        )
    }

    /// As `widen_rx4_avx512` with two input rows, 8 lanes and a scalar tail (`tile_2x4_avx2`'s loop).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn widen_2x4_avx2(x0: &[f32], x1: &[f32], w: [&[bf16]; 4]) -> [[f32; 4]; 2] {
        tiles::tile_2x4_avx2_by(
            x0,
            x1,
            |c, i| {
                let h = _mm_loadu_si128(w[c].as_ptr().add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            },
            |c, t| w[c][t].to_f32(),
            |_| {},
        )
    }

    /// Two bf16 input rows against four bf16 weight rows, 32 products per `vdpbf16ps`; the
    /// row's tail is one more masked step (zeros add nothing).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn dot_2x4_avx512bf16(
        x0: &[bf16],
        x1: &[bf16],
        w: [&[bf16]; 4],
    ) -> [[f32; 4]; 2] {
        let k = x0.len();
        let load = |m: __mmask32, p: *const bf16| -> __m512bh {
            // SAFETY: the mask covers only elements inside the row.
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, p as *const i16))
        };
        let mut acc = [[_mm512_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i < k {
            let m = if i + 32 <= k {
                u32::MAX
            } else {
                (1u32 << (k - i)) - 1
            };
            let a0 = load(m, x0.as_ptr().add(i));
            let a1 = load(m, x1.as_ptr().add(i));
            for c in 0..4 {
                let b = load(m, w[c].as_ptr().add(i));
                acc[0][c] = _mm512_dpbf16_ps(acc[0][c], a0, b);
                acc[1][c] = _mm512_dpbf16_ps(acc[1][c], a1, b);
            }
            i += 32;
        }
        crate::kernels::matmul_small::x86::tile_sums(&acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&f| bf16::from_f32(f)).collect()
    }

    /// `[M, N]` in f64 from f32 inputs: the reference every path is held to.
    fn reference(x: &[f32], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * m];
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t].to_f64())
                    .sum();
            }
        }
        out
    }

    /// Every level with an in-place kernel, on shapes leaving partial quads, odd row counts
    /// and tails of every width: within f32 rounding of f64 math on the same inputs (for
    /// `Avx512Bf16`, on the activations rounded to bf16, which is what it computes), and the
    /// widening levels equal, bit for bit, to `matmul_small` on rows widened into a buffer.
    #[test]
    fn every_level_matches_the_reference() {
        use crate::kernels::matmul_small::{small_rows_at, F32Rows};
        let mut levels = crate::kernels::simd::test_levels("bf16_rows");
        levels.retain(|&l| l != Level::Scalar);
        for level in levels {
            for (m, n, k) in [
                (1, 5, 7),
                (2, 4, 32),
                (3, 9, 17),
                (4, 13, 33),
                (2, 8, 100),
                (5, 7, 255),
                (16, 64, 576),
                (4, 6, 4099),
            ] {
                let x = pseudo(m * k, 11);
                let w = to_bf16(&pseudo(n * k, 12));
                let Some(got) = small_rows_bf16(level, &x, &w, m, n, k) else {
                    assert!(level == Level::Neon, "{level:?} has an in-place kernel");
                    continue;
                };
                let xr: Vec<f32> = if level == Level::Avx512Bf16 {
                    to_bf16(&x).iter().map(|v| v.to_f32()).collect()
                } else {
                    x.clone()
                };
                let want = reference(&xr, &w, m, n, k);
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    let (i, j) = (idx / n, idx % n);
                    let abs: f64 = (0..k)
                        .map(|t| (xr[i * k + t] as f64 * w[j * k + t].to_f64()).abs())
                        .sum();
                    let tol = 4.0 * f32::EPSILON as f64 * (k as f64).sqrt() * abs;
                    assert!(
                        (*g as f64 - e).abs() <= tol,
                        "{level:?} {m}x{n}x{k} [{i},{j}]: {g} vs {e}"
                    );
                }
                if level != Level::Avx512Bf16 {
                    let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                    let buffered = small_rows_at(level, &x, &F32Rows(&wide), m, n, k);
                    let full_tiles = |idx: usize| (idx % n) / 4 < n / 4 && (idx / n) / 2 < m / 2;
                    for (idx, (g, b)) in got.iter().zip(&buffered).enumerate() {
                        if full_tiles(idx) {
                            assert_eq!(g.to_bits(), b.to_bits(), "{level:?} {m}x{n}x{k} @{idx}");
                        }
                    }
                }
            }
        }
    }

    /// GFLOP/s on SmolLM2's decode shapes with bf16 weights streamed from memory (8 matrices of
    /// 1536 x 576: 14 MB): each in-place level against the widen-into-a-buffer path. Prints,
    /// asserts nothing: `cargo test -p sl-engine --release --lib kernels::bf16_rows::tests::timing
    /// -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        use crate::kernels::matmul_small::{small_rows, WeightRows};
        use half::slice::HalfFloatSliceExt;
        // What `widen` does for a bf16 weight: four rows at a time widened into a buffer.
        struct Buffered<'a>(&'a [bf16], usize);
        impl WeightRows for Buffered<'_> {
            const WIDENS: bool = true;
            fn widen(&self, j: usize, out: &mut [f32]) {
                self.0[j * self.1..(j + 1) * self.1].convert_to_f32_slice(out);
            }
        }
        let (k, n, mats, reps) = (576, 1536, 8, 40);
        let ws: Vec<Vec<bf16>> = (0..mats)
            .map(|i| to_bf16(&pseudo(n * k, 20 + i as u64)))
            .collect();
        for m in [1, 16, 32] {
            let x = pseudo(m * k, 1);
            let flop = 2.0 * (m * n * k * mats * reps) as f64;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for w in &ws {
                    std::hint::black_box(small_rows(&x, &Buffered(w, k), m, n, k));
                }
            }
            println!(
                "m={m}: widened into a buffer ({:?}): {:.1} GFLOP/s",
                crate::kernels::simd::level(),
                flop / t.elapsed().as_secs_f64() / 1e9
            );
            for level in crate::kernels::simd::test_levels("bf16_rows") {
                if small_rows_bf16(level, &x[..k], &ws[0][..4 * k], 1, 4, k).is_none() {
                    continue;
                }
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    for w in &ws {
                        std::hint::black_box(small_rows_bf16(level, &x, w, m, n, k));
                    }
                }
                println!(
                    "m={m}: in place, {level:?}: {:.1} GFLOP/s",
                    flop / t.elapsed().as_secs_f64() / 1e9
                );
            }
        }
    }
}
