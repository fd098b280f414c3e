//! The x86 tiles' loops, shared by every weight storage that can be turned into f32 vectors in
//! registers (`bf16_rows`): the caller's closure loads weight row `c`'s vector at column `i`.
//! Always inlined into the caller's `#[target_feature]` function, whose features its closures
//! inherit, so the loads and FMAs compile as one loop with no calls.

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
