//! `x · wᵀ` for the few rows of a decode step, on CPU, without gradients.
//!
//! At decode time a projection sees one row per sequence (16-32 rows) against a weight of
//! hundreds of thousands of values: the work is reading the weight once. candle's gemm is tuned
//! for large row counts (blocked, packed operands); this kernel streams each weight row once and
//! dots it with every input row while it sits in L1 (weights are stored
//! `[out, in]`, so a row of `w` is contiguous). The 2x4 tile has AVX-512, AVX2+FMA and NEON
//! variants, chosen by `simd`; the scalar path is the reference.

use crate::kernels::attention::dot_at;
use crate::kernels::simd::{self, Level};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

/// The most rows the kernel takes on any level (the bf16 widening path's too).
pub const MAX_ROWS: usize = 32;

/// Row counts up to this use the kernel on `level`; beyond it the gemm crate's x-left path
/// (`gemm::matmul_xwt`) wins. With AVX2's 16 registers the tile takes input rows in pairs and
/// loads six vectors per eight FMAs, so it gives way sooner: on a 2-core AMD EPYC (Zen 3) the
/// 30 layers' decode projections, streamed, ran at 54-67 GFLOP/s in the tile against 79 in
/// `matmul_xwt` at 32 rows, 53-60 against 54-61 at 24, 47-54 against 49-58 at 16, and 34
/// against 30 at 8 (`tests::timing`). On AVX-512 the broadcast kernel (`bcast`) takes over
/// past 16 rows: streaming the 30 layers on the 2-core Xeon (model 207) it ran at 131-178
/// GFLOP/s against the four-row tile's 96-130 at 32 rows, 95-99 against 82-103 at 24, and
/// even at 16 (`bcast::tests::timing`, medians of seven alternating runs).
pub fn max_rows(level: Level) -> usize {
    match level {
        Level::Avx2 | Level::Avx512 | Level::Avx512Bf16 => 16,
        _ => MAX_ROWS,
    }
}

/// Runs `f` on a contiguous f32 CPU tensor's values; None for anything else.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Some(f(&v[start..start + layout.shape().elem_count()]))
        }
        _ => None,
    }
}

/// `x: [M, K]`, `w: [N, K]`, both contiguous f32 CPU tensors, M <= `max_rows`: `[M, N]`.
/// None when the inputs do not qualify (the caller falls back to candle's matmul).
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    if k != k2 {
        bail!("matmul_wt: inner dimensions {k} and {k2} differ");
    }
    if m == 0 || m > max_rows(simd::level()) || x.track_op() || w.track_op() {
        return Ok(None);
    }
    let out = with_f32(x, |xv| {
        with_f32(w, |wv| small_rows(xv, &F32Rows(wv), m, n, k))
    })
    .flatten();
    let Some(out) = out else { return Ok(None) };
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

/// Where the kernel reads weight rows: the f32 weight itself, or rows widened from a narrower
/// storage into a small buffer (one row at a time, never the whole matrix).
pub(crate) trait WeightRows: Sync {
    /// True when rows must be widened into a buffer (`widen`), false when `direct` serves them.
    const WIDENS: bool;
    fn direct(&self, j: usize, k: usize) -> &[f32] {
        self.direct_rows(j, 1, k)
    }
    /// Rows `j..j + rows` back to back.
    fn direct_rows(&self, _j: usize, _rows: usize, _k: usize) -> &[f32] {
        unreachable!("only f32 rows are read in place")
    }
    fn widen(&self, _j: usize, _out: &mut [f32]) {
        unreachable!("f32 rows are read in place")
    }
}

pub(crate) struct F32Rows<'a>(pub &'a [f32]);

impl WeightRows for F32Rows<'_> {
    const WIDENS: bool = false;
    fn direct_rows(&self, j: usize, rows: usize, k: usize) -> &[f32] {
        &self.0[j * k..(j + rows) * k]
    }
}

/// `[M, N]`: `x · wᵀ` for the weight rows `src` serves.
pub(crate) fn small_rows<R: WeightRows>(
    xv: &[f32],
    src: &R,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    small_rows_at(simd::level(), xv, src, m, n, k)
}

/// `small_rows` on a given SIMD level.
pub(crate) fn small_rows_at<R: WeightRows>(
    level: Level,
    xv: &[f32],
    src: &R,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    over_tiles(
        m,
        n,
        x_rows(level),
        || if R::WIDENS { vec![0f32; 4 * k] } else { vec![] },
        |scratch, j, nw| {
            if R::WIDENS {
                for (q, buf) in scratch.chunks_exact_mut(k).enumerate().take(nw) {
                    src.widen(j + q, buf);
                }
            }
        },
        |scratch, j, nw, i, nx| {
            let mut w: [&[f32]; 4] = [&[]; 4];
            for (q, slot) in w.iter_mut().enumerate().take(nw) {
                *slot = if R::WIDENS {
                    &scratch[q * k..(q + 1) * k]
                } else {
                    src.direct(j + q, k)
                };
            }
            let next = (!R::WIDENS && i == 0 && nw == 4 && j + 8 <= n)
                .then(|| std::array::from_fn(|q| src.direct(j + 4 + q, k)));
            tile(level, input_rows(xv, k, i, nx), nx, w, nw, next)
        },
    )
}

/// How many input rows a tile takes on `level`: four where there are 32 vector registers (16
/// accumulators), so each weight vector loaded serves four FMAs and the input rows are read
/// from L2 half as often as in pairs; two with AVX2's and NEON's 16.
pub(crate) fn x_rows(level: Level) -> usize {
    match level {
        Level::Avx512 | Level::Avx512Bf16 => 4,
        _ => 2,
    }
}

/// Input rows `i..i + nx` of `x: [M, k]`, the last repeated to fill four slots (a tile computes
/// the repeats and its caller keeps only the first `nx`).
pub(crate) fn input_rows(x: &[f32], k: usize, i: usize, nx: usize) -> [&[f32]; 4] {
    std::array::from_fn(|a| {
        let r = i + a.min(nx - 1);
        &x[r * k..(r + 1) * k]
    })
}

/// The decode kernel's loop, shared by every weight storage: threads take blocks of 16 weight
/// rows; within a block `prep` readies each quad of weight rows (rows `j..j + nw`, nw <= 4) in
/// the thread's `state`, and `tile` dots them with each group of input rows (`i..i + nx`,
/// nx <= `x_rows` <= 4), returning `[input row][weight row]`.
/// The output is `[M, N]` as the caller wants it: a thread's block fills 16 columns (64 bytes)
/// of every row, so no transpose follows (one was a single-threaded copy per projection).
pub(crate) fn over_tiles<S>(
    m: usize,
    n: usize,
    x_rows: usize,
    state: impl Fn() -> S + Sync,
    prep: impl Fn(&mut S, usize, usize) + Sync,
    tile: impl Fn(&S, usize, usize, usize, usize) -> [[f32; 4]; 4] + Sync,
) -> Vec<f32> {
    assert!((1..=4).contains(&x_rows), "a tile takes 1-4 input rows");
    // Not zeroed first: the tiles write every element (the lm_head's output is 3 MB a decode
    // step at 16 rows).
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let block = 16usize;
    let dst = crate::kernels::SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
        let mut s = state();
        let j0 = b * block;
        let rows = block.min(n - j0);
        let mut r = 0;
        while r < rows {
            let nw = (rows - r).min(4);
            prep(&mut s, j0 + r, nw);
            let mut i = 0;
            while i < m {
                let nx = (m - i).min(x_rows);
                let t = tile(&s, j0 + r, nw, i, nx);
                for (a, row) in t.iter().enumerate().take(nx) {
                    for (c, v) in row.iter().enumerate().take(nw) {
                        // SAFETY: row i + a < m, column j0 + r + c < n; each column belongs
                        // to one block, so no two tasks write the same element.
                        unsafe { *dst.get().add((i + a) * n + j0 + r + c) = *v };
                    }
                }
                i += nx;
            }
            r += nw;
        }
    });
    // SAFETY: the blocks cover columns 0..n, and within a block the quads cover its columns
    // and the groups rows 0..m, so every element of the m x n output was written above.
    unsafe { out.set_len(m * n) };
    out
}

/// The next quad of f32 weight rows, for a tile to prefetch while it runs: the first tile of
/// each quad takes it, so the quad's other tiles (and the next quad's first) find it in L2. The
/// hardware's own prefetch kept a streamed decode step at 6-9 GB/s of this machine's 28 (its
/// streams stop at each 4 KB page, and a tile reads four rows 2.3 KB apart); a burst of
/// prefetches before each quad stalled on full fill buffers instead.
pub(crate) type Next<'a> = Option<[&'a [f32]; 4]>;

/// `x[..nx] · w[..nw]` (nx <= 4, nw <= 4); a full quad of weight rows takes the level's tile
/// (four input rows on AVX-512, pairs elsewhere and for a tail), anything else the level's dot
/// product.
#[inline]
fn tile(
    level: Level,
    x: [&[f32]; 4],
    nx: usize,
    w: [&[f32]; 4],
    nw: usize,
    next: Next,
) -> [[f32; 4]; 4] {
    // Only the x86 tiles prefetch.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = next;
    let mut t = [[0f32; 4]; 4];
    // Rows the tiles served; the rest take the dot product. A lone third row stays with the dot
    // product, as it did when tiles took pairs only: every sum is computed as it was before the
    // 4-row tile, so outputs are the same to the bit.
    let mut done = 0;
    if nw == 4 {
        match level {
            // SAFETY: `level` is one the CPU runs (simd::choice, simd::test_levels); every row
            // has length k.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Bf16 if nx == 4 => {
                return unsafe { tile_avx512(x, w, next) };
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Bf16 if nx >= 2 => {
                t[..2].copy_from_slice(&unsafe { tile_avx512([x[0], x[1]], w, next) });
                done = 2;
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if nx == 2 => {
                t[..2].copy_from_slice(&unsafe { tile_2x4_avx2(x[0], x[1], w, next) });
                done = 2;
            }
            #[cfg(target_arch = "aarch64")]
            Level::Neon if nx == 2 => {
                t[..2].copy_from_slice(&unsafe { tile_2x4_neon(x[0], x[1], w) });
                done = 2;
            }
            _ => {}
        }
    }
    for (a, xa) in x.iter().enumerate().take(nx).skip(done) {
        for (c, wc) in w.iter().enumerate().take(nw) {
            t[a][c] = dot_at(level, xa, wc);
        }
    }
    t
}

/// Two input rows against four weight rows: eight 8-lane accumulators, six loads per eight
/// FMAs, so the loop is bound by FMA throughput rather than by loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_2x4_avx2(x0: &[f32], x1: &[f32], w: [&[f32]; 4], next: Next) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let wv = |c: usize, i: usize| _mm256_loadu_ps(w[c].as_ptr().add(i));
    let wt = |c: usize, t: usize| w[c][t];
    match next {
        // One line of 16 values per row every other step of 8.
        Some(rows) => x86::tile_2x4_avx2_by(x0, x1, wv, wt, |i| {
            if i % 16 == 0 {
                x86::fetch_line(rows, i)
            }
        }),
        None => x86::tile_2x4_avx2_by(x0, x1, wv, wt, |_| {}),
    }
}

/// As `tile_2x4_avx2` with 16 lanes and R input rows (2: eight zmm accumulators; 4: sixteen,
/// eight loads per sixteen FMAs), the row's tail as one more masked step instead of scalar
/// code. Every sum is the same, in the same order, whatever R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(x: [&[f32]; R], w: [&[f32]; 4], next: Next) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    let wv = |c: usize, i: usize, m| _mm512_maskz_loadu_ps(m, w[c].as_ptr().add(i));
    // One loop with the prefetch and one without, so neither tests `next` at each step.
    match next {
        Some(rows) => x86::tile_rx4_avx512_by(x, wv, |i| x86::fetch_line(rows, i)),
        None => x86::tile_rx4_avx512_by(x, wv, |_| {}),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// As `tile_2x4_avx2` with 4-lane NEON vectors.
#[cfg(target_arch = "aarch64")]
unsafe fn tile_2x4_neon(x0: &[f32], x1: &[f32], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::aarch64::*;
    let k = x0.len();
    let mut acc = [[vdupq_n_f32(0.0); 4]; 2];
    let mut i = 0;
    while i + 4 <= k {
        let a0 = vld1q_f32(x0.as_ptr().add(i));
        let a1 = vld1q_f32(x1.as_ptr().add(i));
        for c in 0..4 {
            let b = vld1q_f32(w[c].as_ptr().add(i));
            acc[0][c] = vfmaq_f32(acc[0][c], a0, b);
            acc[1][c] = vfmaq_f32(acc[1][c], a1, b);
        }
        i += 4;
    }
    let mut out = [[0f32; 4]; 2];
    for (a, x) in [x0, x1].iter().enumerate() {
        for c in 0..4 {
            let mut s = vaddvq_f32(acc[a][c]);
            for t in i..k {
                s += x[t] * w[c][t];
            }
            out[a][c] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests;
