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

/// Row counts up to this use the kernel (beyond it, gemm's blocking wins).
pub const MAX_ROWS: usize = 32;

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

/// `x: [M, K]`, `w: [N, K]`, both contiguous f32 CPU tensors, M <= MAX_ROWS: `[M, N]`.
/// None when the inputs do not qualify (the caller falls back to candle's matmul).
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    if k != k2 {
        bail!("matmul_wt: inner dimensions {k} and {k2} differ");
    }
    if m == 0 || m > MAX_ROWS || x.track_op() || w.track_op() {
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
    fn direct(&self, _j: usize, _k: usize) -> &[f32] {
        unreachable!("only f32 rows are read in place")
    }
    fn widen(&self, _j: usize, _out: &mut [f32]) {
        unreachable!("f32 rows are read in place")
    }
}

pub(crate) struct F32Rows<'a>(pub &'a [f32]);

impl WeightRows for F32Rows<'_> {
    const WIDENS: bool = false;
    fn direct(&self, j: usize, k: usize) -> &[f32] {
        &self.0[j * k..(j + 1) * k]
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

/// The x86 tiles' loops, shared by every weight storage that can be turned into f32 vectors in
/// registers (`bf16_rows`): the caller's closure loads weight row `c`'s vector at column `i`.
/// Always inlined into the caller's `#[target_feature]` function, whose features its closures
/// inherit, so the loads and FMAs compile as one loop with no calls.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use crate::kernels::attention::x86::{hsum256, tail_mask};
    use std::arch::x86_64::*;

    /// `wv(c, i)`: 8 weights of row c from column i; `wt(c, t)`: one weight, for the scalar tail.
    #[inline(always)]
    pub(crate) unsafe fn tile_2x4_avx2_by(
        x0: &[f32],
        x1: &[f32],
        wv: impl Fn(usize, usize) -> __m256,
        wt: impl Fn(usize, usize) -> f32,
        ahead: impl Fn(usize),
    ) -> [[f32; 4]; 2] {
        let k = x0.len();
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 8 <= k {
            ahead(i);
            let a0 = _mm256_loadu_ps(x0.as_ptr().add(i));
            let a1 = _mm256_loadu_ps(x1.as_ptr().add(i));
            // c also names the weight row the closure loads, not only the accumulator.
            #[allow(clippy::needless_range_loop)]
            for c in 0..4 {
                let b = wv(c, i);
                acc[0][c] = _mm256_fmadd_ps(a0, b, acc[0][c]);
                acc[1][c] = _mm256_fmadd_ps(a1, b, acc[1][c]);
            }
            i += 8;
        }
        let mut out = [[0f32; 4]; 2];
        for (a, x) in [x0, x1].iter().enumerate() {
            for c in 0..4 {
                let mut s = hsum256(acc[a][c]);
                for t in i..k {
                    s += x[t] * wt(c, t);
                }
                out[a][c] = s;
            }
        }
        out
    }

    /// Column `i` of each of the next quad's rows on its way to L2 (a hint: no effect on any
    /// result). No test per row: `i` stays below the rows' common length in a tile's loop, and
    /// a prefetch never faults, so a column past a row's end would only waste the hint.
    #[inline(always)]
    pub(crate) fn fetch_line(rows: [&[f32]; 4], i: usize) {
        for row in rows {
            let p = row.as_ptr().wrapping_add(i) as *const i8;
            // SAFETY: a prefetch reads nothing and cannot fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p) };
        }
    }

    /// `wv(c, i, m)`: 16 weights of row c from column i, lanes outside `m` zero; `ahead(i)` runs
    /// at each step (a prefetch, or nothing). R input rows (2 or 4) against four weight rows;
    /// each sum's FMAs and reduction are the same whatever R.
    #[inline(always)]
    pub(crate) unsafe fn tile_rx4_avx512_by<const R: usize>(
        x: [&[f32]; R],
        wv: impl Fn(usize, usize, __mmask16) -> __m512,
        ahead: impl Fn(usize),
    ) -> [[f32; 4]; R] {
        let k = x[0].len();
        let mut xp = [std::ptr::null::<f32>(); R];
        for r in 0..R {
            xp[r] = x[r].as_ptr();
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        // A macro, not a closure: a closure is a function of its own, compiled without the
        // caller's `#[target_feature]`s, and calls each intrinsic when it is not inlined.
        macro_rules! step {
            ($i:expr, $m:expr) => {{
                let (i, m): (usize, __mmask16) = ($i, $m);
                let mut a = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    a[r] = _mm512_maskz_loadu_ps(m, xp[r].add(i));
                }
                // c also names the weight row the closure loads, not only the accumulator.
                #[allow(clippy::needless_range_loop)]
                for c in 0..4 {
                    let b = wv(c, i, m);
                    for r in 0..R {
                        acc[r][c] = _mm512_fmadd_ps(a[r], b, acc[r][c]);
                    }
                }
            }};
        }
        // Whole steps with a constant mask (plain loads: no mask arithmetic in the loop), then
        // the row's tail as one masked step; zeros beyond it add nothing, so each sum is as if
        // every step were masked.
        let whole = k - k % 16;
        let mut i = 0;
        while i < whole {
            ahead(i);
            step!(i, 0xFFFF);
            i += 16;
        }
        if i < k {
            step!(i, tail_mask(k - i));
        }
        tile_sums(&acc)
    }

    /// The lane sums of a tile's accumulators (`acc[input row][weight row]`, R <= 4) by one
    /// `sums16`; rows past R sum zeros and are dropped.
    #[inline(always)]
    pub(crate) unsafe fn tile_sums<const R: usize>(acc: &[[__m512; 4]; R]) -> [[f32; 4]; R] {
        let mut v = [_mm512_setzero_ps(); 16];
        for (a, row) in acc.iter().enumerate() {
            v[4 * a..4 * a + 4].copy_from_slice(row);
        }
        let mut all = [[0f32; 4]; 4];
        _mm512_storeu_ps(all.as_mut_ptr().cast(), sums16(v));
        let mut out = [[0f32; 4]; R];
        out.copy_from_slice(&all[..R]);
        out
    }

    /// The lane sums of sixteen vectors at once, lane n holding `v[n]`'s: a transposing tree
    /// of 15 adds and 30 shuffles instead of sixteen reductions of ~8 instructions each (a
    /// fifth of a 4x4 tile's time at K = 576). Each sum is added in `_mm512_reduce_add_ps`'s
    /// order (lanes l + l+8, then + l+4, + l+2, + l+1), so the results are the same to the bit.
    #[inline(always)]
    pub(crate) unsafe fn sums16(v: [__m512; 16]) -> __m512 {
        // Loops, not `array::from_fn`: its closures are functions of their own, compiled
        // without the caller's `#[target_feature]`s, and call each intrinsic when not inlined.
        // Fed transposed: the tree leaves vector 4m + k's sum in lane 4k + m.
        let mut w = [_mm512_setzero_ps(); 16];
        for (i, wi) in w.iter_mut().enumerate() {
            *wi = v[(i % 4) * 4 + i / 4];
        }
        // Pairs of vectors into one: its quarters are [x0 + x2, x1 + x3, y0 + y2, y1 + y3].
        let mut r = [_mm512_setzero_ps(); 8];
        for (i, ri) in r.iter_mut().enumerate() {
            let (x, y) = (w[2 * i], w[2 * i + 1]);
            *ri = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            );
        }
        // Quarter q of s[j]: vector 4j + q's four partial sums.
        let mut s = [_mm512_setzero_ps(); 4];
        for (j, sj) in s.iter_mut().enumerate() {
            let (x, y) = (r[2 * j], r[2 * j + 1]);
            *sj = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            );
        }
        // Within each quarter, lanes l + l+2 of two vectors side by side.
        let mut u = [_mm512_setzero_ps(); 2];
        for (h, uh) in u.iter_mut().enumerate() {
            let (x, y) = (s[2 * h], s[2 * h + 1]);
            *uh = _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            );
        }
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(u[0], u[1]),
            _mm512_shuffle_ps::<0xDD>(u[0], u[1]),
        )
    }
}

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
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use candle_core::Device;

    #[test]
    fn equals_candle_matmul_on_every_tail() {
        for (m, n, k) in [
            (1, 5, 7),
            (2, 4, 8),
            (3, 9, 17),
            (16, 576, 576),
            (17, 61, 96),
            (32, 1000, 1536),
            (31, 3, 1001),
        ] {
            let x = Tensor::from_vec(pseudo(m * k, 1), (m, k), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(pseudo(n * k, 2), (n, k), &Device::Cpu).unwrap();
            let got = matmul_wt(&x, &w)
                .unwrap()
                .expect("qualifies")
                .to_vec2::<f32>()
                .unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (gr, wr) in got.iter().zip(&want) {
                for (g, e) in gr.iter().zip(wr) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt(),
                        "{m}x{n}x{k}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let w = Tensor::from_vec(pseudo(64, 3), (8, 8), &Device::Cpu).unwrap();
        let big = Tensor::from_vec(
            pseudo(8 * (MAX_ROWS + 1), 4),
            (MAX_ROWS + 1, 8),
            &Device::Cpu,
        )
        .unwrap();
        assert!(matmul_wt(&big, &w).unwrap().is_none(), "too many rows");
        let var = candle_core::Var::from_tensor(&w).unwrap();
        let x = Tensor::from_vec(pseudo(16, 5), (2, 8), &Device::Cpu).unwrap();
        assert!(
            matmul_wt(&x, var.as_tensor()).unwrap().is_none(),
            "a trainable weight needs candle's backward"
        );
        let strided = Tensor::from_vec(pseudo(16, 6), (8, 2), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(
            matmul_wt(&strided, &w).unwrap().is_none(),
            "non-contiguous input"
        );
    }

    /// The AVX-512 tile of four input rows gives each sum to the bit as the tile of two does
    /// (same FMAs, same order, same reduction), so a batch's tokens do not depend on which tile
    /// served them; a tail of every width.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn four_row_tile_sums_as_pairs() {
        let levels = crate::kernels::simd::test_levels("matmul_small");
        if !levels.contains(&Level::Avx512) {
            return;
        }
        for k in [7, 16, 33, 576, 1001] {
            let (x, w) = (pseudo(4 * k, 9), pseudo(4 * k, 10));
            let xs: [&[f32]; 4] = std::array::from_fn(|a| &x[a * k..(a + 1) * k]);
            let ws: [&[f32]; 4] = std::array::from_fn(|c| &w[c * k..(c + 1) * k]);
            // SAFETY: test_levels lists Avx512 only where the CPU runs it.
            let (four, lo, hi) = unsafe {
                (
                    tile_avx512(xs, ws, None),
                    tile_avx512([xs[0], xs[1]], ws, None),
                    tile_avx512([xs[2], xs[3]], ws, Some(ws)),
                )
            };
            let pairs = [lo[0], lo[1], hi[0], hi[1]];
            for (a, (f, p)) in four.iter().zip(&pairs).enumerate() {
                for c in 0..4 {
                    assert_eq!(f[c].to_bits(), p[c].to_bits(), "k {k}, [{a}, {c}]");
                }
            }
        }
    }

    /// The transposing reduction adds in `_mm512_reduce_add_ps`'s order: values spanning 24
    /// binary orders of magnitude, where any other order rounds differently.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn sums16_adds_as_reduce_add() {
        use std::arch::x86_64::*;
        if !crate::kernels::simd::test_levels("matmul_small").contains(&Level::Avx512) {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn both(vals: &[f32]) -> ([f32; 16], [f32; 16]) {
            let v: [__m512; 16] = std::array::from_fn(|n| _mm512_loadu_ps(vals[16 * n..].as_ptr()));
            let mut got = [0f32; 16];
            _mm512_storeu_ps(got.as_mut_ptr(), x86::sums16(v));
            (got, std::array::from_fn(|n| _mm512_reduce_add_ps(v[n])))
        }
        for seed in 0..200u64 {
            let vals: Vec<f32> = pseudo(256, 40 + seed)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (2f32).powi((i * 7 % 25) as i32 - 12))
                .collect();
            // SAFETY: test_levels lists Avx512 only where the CPU runs it.
            let (got, want) = unsafe { both(&vals) };
            for n in 0..16 {
                assert_eq!(got[n].to_bits(), want[n].to_bits(), "seed {seed}, lane {n}");
            }
        }
    }

    #[test]
    fn every_level_matches_scalar() {
        for level in crate::kernels::simd::test_levels("matmul_small") {
            // 1-4 rows (and an odd 5), weight counts leaving partial quads, widths that are not
            // a multiple of 8 or 16, and a long K.
            for (m, n, k) in [
                (1, 5, 7),
                (2, 4, 16),
                (3, 9, 17),
                (4, 13, 33),
                (2, 8, 100),
                (5, 7, 255),
                (4, 6, 4099),
                (6, 8, 50),
                (7, 9, 40),
                (8, 12, 576),
            ] {
                let (x, w) = (pseudo(m * k, 7), pseudo(n * k, 8));
                let got = small_rows_at(level, &x, &F32Rows(&w), m, n, k);
                let want = small_rows_at(Level::Scalar, &x, &F32Rows(&w), m, n, k);
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    let (i, j) = (idx / n, idx % n);
                    let abs: f32 = x[i * k..(i + 1) * k]
                        .iter()
                        .zip(&w[j * k..(j + 1) * k])
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    let tol = 4.0 * f32::EPSILON * (k as f32).sqrt() * abs;
                    assert!(
                        (g - e).abs() <= tol,
                        "{level:?} {m}x{n}x{k} [{i},{j}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// GFLOP/s of the decode kernel at each level this CPU runs: one tile in L1; 4-32 rows
    /// (K = 576) against a weight held in L2; and a decode step's projections of 8 SmolLM2
    /// layers streamed from memory at 1, 16 and 32 rows (the generation and localisation
    /// benchmarks' batches), best of 5. Prints, asserts nothing (a measurement, not a test):
    /// `cargo test -p sl-engine --release --lib kernels::matmul_small::tests::timing --
    /// --ignored --nocapture` (RAYON_NUM_THREADS=1 for one core's figures).
    #[test]
    #[ignore]
    fn timing() {
        // One tile alone on L1-resident rows of 576: the kernel's own speed, against which the
        // whole-matrix figures show what memory and bookkeeping cost.
        let k = 576;
        let (x, w) = (pseudo(4 * k, 1), pseudo(4 * k, 2));
        for level in crate::kernels::simd::test_levels("matmul_small") {
            let (reps, nx) = (100_000, x_rows(level));
            let t = std::time::Instant::now();
            for _ in 0..reps {
                let xs = input_rows(&x, k, 0, nx);
                let ws = [&w[..k], &w[k..2 * k], &w[2 * k..3 * k], &w[3 * k..]];
                std::hint::black_box(tile(level, std::hint::black_box(xs), nx, ws, 4, None));
            }
            let flop = 2.0 * (4 * nx * k * reps) as f64;
            println!(
                "{level:?} one {nx}x4 tile, L1, one thread: {:.1} GFLOP/s",
                flop / t.elapsed().as_secs_f64() / 1e9
            );
        }
        // Weights in L2 (N = 256: 590 KB), best of 5.
        for (m, n, reps) in [
            (4, 256, 8000),
            (8, 256, 4000),
            (16, 256, 2000),
            (32, 256, 1000),
        ] {
            let (x, w) = (pseudo(m * k, 1), pseudo(n * k, 2));
            for level in crate::kernels::simd::test_levels("matmul_small") {
                let flop = 2.0 * (m * n * k * reps) as f64 / 5.0;
                let g = crate::kernels::gflops(flop, &mut || {
                    for _ in 0..reps / 5 {
                        std::hint::black_box(small_rows_at(level, &x, &F32Rows(&w), m, n, k));
                    }
                });
                println!("{level:?} m={m} k={k} n={n}: {g:.1} GFLOP/s");
            }
        }
        // A decode step's projections of 8 SmolLM2 layers, streamed from memory (113 MB):
        // qkv, o, gate_up [N, 576] and down [576, 1536].
        let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
        let ws: Vec<(usize, usize, Vec<f32>)> = (0..8 * shapes.len())
            .map(|i| {
                let (n, k) = shapes[i % shapes.len()];
                (n, k, pseudo(n * k, 2 + i as u64))
            })
            .collect();
        for m in [1, 16, 32] {
            let xs: Vec<Vec<f32>> = ws.iter().map(|(_, k, _)| pseudo(m * k, 1)).collect();
            let flop: usize = ws.iter().map(|(n, k, _)| 2 * m * n * k).sum();
            for level in crate::kernels::simd::test_levels("matmul_small") {
                let g = crate::kernels::gflops(flop as f64, &mut || {
                    for ((n, k, w), x) in ws.iter().zip(&xs) {
                        std::hint::black_box(small_rows_at(level, x, &F32Rows(w), m, *n, *k));
                    }
                });
                let gbs = g * 4.0 / (2.0 * m as f64);
                println!(
                    "{level:?} m={m}, 8 layers streamed: {g:.1} GFLOP/s ({gbs:.1} GB/s of weights)"
                );
            }
        }
        // Each projection's shape alone, streamed (the 8 layers' copies of it in turn): where
        // the streamed figure above loses against the L2 one.
        for m in [16, 32] {
            for (s, (n, k)) in shapes.iter().enumerate() {
                let mine: Vec<&(usize, usize, Vec<f32>)> =
                    ws.iter().skip(s).step_by(shapes.len()).collect();
                let x = pseudo(m * k, 1);
                let level = crate::kernels::simd::level();
                let flop = (2 * m * n * k * mine.len()) as f64;
                let g = crate::kernels::gflops(flop, &mut || {
                    for (n, k, w) in &mine {
                        std::hint::black_box(small_rows_at(level, &x, &F32Rows(w), m, *n, *k));
                    }
                });
                println!("{level:?} m={m} [{n}, {k}] x8 streamed: {g:.1} GFLOP/s");
            }
        }
    }
}
