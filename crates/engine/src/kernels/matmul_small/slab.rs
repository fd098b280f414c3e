//! `x · wᵀ` for a decode step's 8-128 rows on AVX2+FMA, where the 2x4 dot-product tile runs
//! out of registers. The input rows go transposed into slabs of 16 (two vectors per column of
//! x); each weight value is broadcast and multiplied into both, six weight rows at a time:
//! twelve accumulators, two slab vectors and the broadcast fill the 16 registers, and eight
//! loads feed twelve FMAs. Weight rows are read in place as stored (`[out, in]`), with the next
//! six prefetched while the current six run, so nothing packs the weight on any call.
//!
//! Every output is one FMA chain over k in order from zero, whatever the slab, the thread
//! split or where the weight rows came from (read in place or widened), so a dequantized
//! weight gives the f32 load's values to the bit.

use super::WeightRows;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Weight rows one tile takes.
const NR: usize = 6;

/// Weight rows a task takes: eight tiles, so a thread's rows stay in a run of pages and the
/// pool still has 32 tasks for a 1536-row projection.
const BLOCK: usize = 48;

/// Input rows transposed: `data[p * width + r]` is x's row `first + r`, column p; rows past m
/// are zero.
struct Slab {
    first: usize,
    width: usize,
    data: Vec<f32>,
}

/// Slabs of 16 rows, the last 8 wide when 8 or fewer rows remain (m = 24 takes 16 + 8).
fn slabs(x: &[f32], m: usize, k: usize) -> Vec<Slab> {
    let mut out = Vec::new();
    let mut first = 0;
    while first < m {
        let width = if m - first > 8 { 16 } else { 8 };
        let mut data = vec![0f32; k * width];
        for (r, row) in x[first * k..]
            .chunks_exact(k)
            .take(width.min(m - first))
            .enumerate()
        {
            for (p, v) in row.iter().enumerate() {
                data[p * width + r] = *v;
            }
        }
        out.push(Slab { first, width, data });
        first += width;
    }
    out
}

/// `[m, n]`: `x [m, k] · wᵀ` for the n weight rows `rows` serves. The caller has checked that
/// the CPU has AVX2 and FMA (`simd::level`).
pub(crate) fn slab_rows<R: WeightRows>(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &R,
    n: usize,
) -> Vec<f32> {
    assert!(x.len() >= m * k, "slab_rows: the input is too short");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let slabs = slabs(x, m, k);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let dst = crate::kernels::SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(BLOCK)).into_par_iter().for_each(|b| {
        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
        let mut widened = vec![0f32; if R::WIDENS { NR * k } else { 0 }];
        let mut t = [[0f32; 16]; NR];
        for jt in (j0..j1).step_by(NR) {
            let nw = NR.min(j1 - jt);
            // A short tile repeats its last row; the repeats' sums are not stored.
            let w: [*const f32; NR] = if R::WIDENS {
                for (c, buf) in widened.chunks_exact_mut(k).take(nw).enumerate() {
                    rows.widen(jt + c, buf);
                }
                std::array::from_fn(|c| widened[c.min(nw - 1) * k..].as_ptr())
            } else {
                std::array::from_fn(|c| rows.direct(jt + c.min(nw - 1), k).as_ptr())
            };
            // The next tile's rows, on their way to L2 while this one's first slab runs.
            let next = (!R::WIDENS && jt + 2 * NR <= n)
                .then(|| std::array::from_fn(|c| rows.direct(jt + NR + c, k).as_ptr()));
            for (s, slab) in slabs.iter().enumerate() {
                let ahead = if s == 0 { next } else { None };
                // SAFETY: simd::level chose AVX2+FMA (the caller's contract); each weight
                // pointer starts a row of k values and the slab holds k columns of `width`.
                unsafe {
                    match slab.width {
                        16 => tile::<2>(&slab.data, w, k, ahead, &mut t),
                        _ => tile::<1>(&slab.data, w, k, ahead, &mut t),
                    }
                }
                for (c, col) in t.iter().enumerate().take(nw) {
                    for (r, v) in col.iter().enumerate().take(slab.width.min(m - slab.first)) {
                        // SAFETY: row first + r < m, column jt + c < j1 <= n; each task
                        // writes only its own columns.
                        unsafe { *dst.get().add((slab.first + r) * n + jt + c) = *v };
                    }
                }
            }
        }
    });
    // SAFETY: the tasks' blocks cover columns 0..n, their tiles every column of the block and
    // the slabs every row below m, so each of the m x n elements was written above.
    unsafe { out.set_len(m * n) };
    out
}

/// `out[c][..8 * V]` = the slab's `8 * V` rows dotted with weight row `w[c]`, over k.
///
/// # Safety
/// AVX2 and FMA must be present; `xs` holds `k * 8 * V` values; each `w[c]` (and each
/// `ahead[c]`, a prefetch hint only) points at a row of k values.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const V: usize>(
    xs: &[f32],
    w: [*const f32; NR],
    k: usize,
    ahead: Option<[*const f32; NR]>,
    out: &mut [[f32; 16]; NR],
) {
    debug_assert!(xs.len() >= k * 8 * V);
    let mut acc = [[_mm256_setzero_ps(); NR]; V];
    let xp = xs.as_ptr();
    // A macro, not a closure, so the loads and FMAs compile inside this function's features.
    macro_rules! steps {
        ($from:expr, $to:expr) => {
            for p in $from..$to {
                let mut a = [_mm256_setzero_ps(); V];
                for (v, av) in a.iter_mut().enumerate() {
                    *av = _mm256_loadu_ps(xp.add((p * V + v) * 8));
                }
                for c in 0..NR {
                    let b = _mm256_broadcast_ss(&*w[c].add(p));
                    for v in 0..V {
                        acc[v][c] = _mm256_fmadd_ps(a[v], b, acc[v][c]);
                    }
                }
            }
        };
    }
    match ahead {
        Some(rows) => {
            // One 64-byte line of each next row per 16 columns.
            let mut p = 0;
            while p < k {
                for r in rows {
                    _mm_prefetch::<_MM_HINT_T1>(r.wrapping_add(p) as *const i8);
                }
                let to = (p + 16).min(k);
                steps!(p, to);
                p = to;
            }
        }
        None => steps!(0, k),
    }
    for (v, row) in acc.iter().enumerate() {
        for (o, a) in out.iter_mut().zip(row) {
            _mm256_storeu_ps(o.as_mut_ptr().add(v * 8), *a);
        }
    }
}
