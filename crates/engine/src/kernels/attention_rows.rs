//! The AVX-512 and AVX2 inner loops of CPU attention, a block of keys at a time: the scores of
//! up to 16 keys at once, and the softmax-weighted sum of value rows with the output row held in
//! registers across the keys.
//!
//! Every score and every output value is computed by the same operations in the same order as
//! the one-key kernels (`dot_avx512` and `dot_avx2` are built on `dot_lanes` and
//! `dot_lanes_avx2`; the weighted sums repeat `axpy_avx512`'s and `axpy_avx2`'s FMA per element
//! and key), so the results are the same to the bit. What goes is per-key overhead: at decode
//! time a head is 64 wide, so one key's dot product was four to eight FMAs behind a call and a
//! horizontal reduction (here eight or sixteen are reduced at once by `sums8` and `sums16`),
//! and each key's axpy loaded and stored the whole output row.

use crate::kernels::attention::x86::tail_mask;
use crate::kernels::matmul_small::x86::sums16;
use std::arch::x86_64::*;

/// The vector whose lane sum is `a · b` in `dot_avx512`: two accumulators over steps of 32,
/// then a step of 16 into the first, a masked tail into the second, and their sum.
///
/// # Safety
/// AVX-512F present; `pa` and `pb` readable for `k` values.
#[inline(always)]
pub(crate) unsafe fn dot_lanes(pa: *const f32, pb: *const f32, k: usize) -> __m512 {
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= k {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        s1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i + 16)),
            _mm512_loadu_ps(pb.add(i + 16)),
            s1,
        );
        i += 32;
    }
    if i + 16 <= k {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        i += 16;
    }
    if i < k {
        let m = tail_mask(k - i);
        let (x, y) = (
            _mm512_maskz_loadu_ps(m, pa.add(i)),
            _mm512_maskz_loadu_ps(m, pb.add(i)),
        );
        s1 = _mm512_fmadd_ps(x, y, s1);
    }
    _mm512_add_ps(s0, s1)
}

/// `out[j] = q · keys[j * d..(j + 1) * d]` for `j < n` (n <= 16, d = `q.len()`), each as
/// `dot_avx512` computes it; `out[n..]` is left as it was.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dots16(q: &[f32], keys: &[f32], n: usize, out: &mut [f32; 16]) {
    let d = q.len();
    assert!(
        n <= 16 && keys.len() >= n * d,
        "dots16: {n} keys of {d} out of bounds"
    );
    let mut v = [_mm512_setzero_ps(); 16];
    for (j, vj) in v.iter_mut().enumerate().take(n) {
        *vj = dot_lanes(q.as_ptr(), keys.as_ptr().add(j * d), d);
    }
    let mut all = [0f32; 16];
    _mm512_storeu_ps(all.as_mut_ptr(), sums16(v));
    out[..n].copy_from_slice(&all[..n]);
}

/// `o += (p[s] / sum) · values[s * d..(s + 1) * d]` for every s with `p[s] != 0`, in order of
/// s (d = `o.len()`): per element the FMAs of one `axpy_avx512` per key, in the same order,
/// with the output row kept in registers (64 columns at a time) instead of loaded and stored
/// per key.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn weighted_rows(p: &[f32], sum: f32, values: &[f32], o: &mut [f32]) {
    let d = o.len();
    assert!(
        values.len() >= p.len() * d,
        "weighted_rows: {} rows of {d} out of bounds",
        p.len()
    );
    let (pv, po) = (values.as_ptr(), o.as_mut_ptr());
    let mut c0 = 0;
    while c0 < d {
        let width = (d - c0).min(64);
        // Lanes of each of the (up to) four vectors: whole ones, then the tail's mask.
        let mut masks = [0 as __mmask16; 4];
        for (v, m) in masks.iter_mut().enumerate() {
            let lanes = width.saturating_sub(16 * v).min(16);
            *m = if lanes == 16 {
                0xFFFF
            } else {
                tail_mask(lanes)
            };
        }
        let nv = width.div_ceil(16);
        let mut acc = [_mm512_setzero_ps(); 4];
        for v in 0..nv {
            acc[v] = _mm512_maskz_loadu_ps(masks[v], po.add(c0 + 16 * v));
        }
        for (s, &w) in p.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let wv = _mm512_set1_ps(w / sum);
            let row = pv.add(s * d + c0);
            for v in 0..nv {
                let x = _mm512_maskz_loadu_ps(masks[v], row.add(16 * v));
                acc[v] = _mm512_fmadd_ps(wv, x, acc[v]);
            }
        }
        for v in 0..nv {
            _mm512_mask_storeu_ps(po.add(c0 + 16 * v), masks[v], acc[v]);
        }
        c0 += width;
    }
}

/// The vector whose lane sum (`hsum256`) is `a · b` in `dot_avx2` before its scalar tail, and
/// where that tail starts: two accumulators over steps of 16, then a step of 8 into the first.
///
/// # Safety
/// AVX2 and FMA present; `pa` and `pb` readable for `k` values.
#[inline(always)]
pub(crate) unsafe fn dot_lanes_avx2(pa: *const f32, pb: *const f32, k: usize) -> (__m256, usize) {
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
    (_mm256_add_ps(s0, s1), i)
}

/// The lane sums of eight vectors at once, lane n holding `v[n]`'s, each added in `hsum256`'s
/// order (lanes l + l+4, then + l+2, then + l+1), so the results are the same to the bit.
#[inline(always)]
unsafe fn sums8(v: [__m256; 8]) -> __m256 {
    // The tree leaves input i's sum in lane [0, 4, 1, 5, 2, 6, 3, 7][i]: fed so that lane n
    // gets v[n].
    const FROM: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
    // Halves of a pair side by side, added: [x0 + x4 .. x3 + x7, y0 + y4 .. y3 + y7].
    let mut r = [_mm256_setzero_ps(); 4];
    for (i, ri) in r.iter_mut().enumerate() {
        let (x, y) = (v[FROM[2 * i]], v[FROM[2 * i + 1]]);
        *ri = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(x, y),
            _mm256_permute2f128_ps::<0x31>(x, y),
        );
    }
    // Within each half, lanes l + l+2 of two vectors side by side.
    let mut u = [_mm256_setzero_ps(); 2];
    for (h, uh) in u.iter_mut().enumerate() {
        let (x, y) = (r[2 * h], r[2 * h + 1]);
        *uh = _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(x, y),
            _mm256_shuffle_ps::<0xEE>(x, y),
        );
    }
    _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(u[0], u[1]),
        _mm256_shuffle_ps::<0xDD>(u[0], u[1]),
    )
}

/// `dots16` on AVX2: each score as `dot_avx2` computes it.
///
/// # Safety
/// AVX2 and FMA present.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dots16_avx2(q: &[f32], keys: &[f32], n: usize, out: &mut [f32; 16]) {
    let d = q.len();
    assert!(
        n <= 16 && keys.len() >= n * d,
        "dots16_avx2: {n} keys of {d} out of bounds"
    );
    let mut all = [0f32; 16];
    let mut tail = 0;
    for (half, at) in all.chunks_exact_mut(8).enumerate() {
        let mut v = [_mm256_setzero_ps(); 8];
        for (j, vj) in v
            .iter_mut()
            .enumerate()
            .take(n.saturating_sub(8 * half).min(8))
        {
            (*vj, tail) = dot_lanes_avx2(q.as_ptr(), keys.as_ptr().add((8 * half + j) * d), d);
        }
        _mm256_storeu_ps(at.as_mut_ptr(), sums8(v));
    }
    for (j, s) in all.iter_mut().enumerate().take(n) {
        let key = &keys[j * d..(j + 1) * d];
        for t in tail..d {
            *s += q[t] * key[t];
        }
    }
    out[..n].copy_from_slice(&all[..n]);
}

/// `weighted_rows` on AVX2: per element the FMAs of one `axpy_avx2` per key, in the same
/// order, with the output row kept in registers (64 columns at a time); a row's last d % 8
/// columns take `axpy_avx2`'s scalar steps, key by key.
///
/// # Safety
/// AVX2 and FMA present.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn weighted_rows_avx2(p: &[f32], sum: f32, values: &[f32], o: &mut [f32]) {
    let d = o.len();
    assert!(
        values.len() >= p.len() * d,
        "weighted_rows_avx2: {} rows of {d} out of bounds",
        p.len()
    );
    let (pv, po) = (values.as_ptr(), o.as_mut_ptr());
    let whole = d / 8 * 8;
    let mut c0 = 0;
    while c0 < whole {
        let nv = ((whole - c0) / 8).min(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (v, a) in acc.iter_mut().enumerate().take(nv) {
            *a = _mm256_loadu_ps(po.add(c0 + 8 * v));
        }
        for (s, &w) in p.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let wv = _mm256_set1_ps(w / sum);
            let row = pv.add(s * d + c0);
            for (v, a) in acc.iter_mut().enumerate().take(nv) {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * v)), *a);
            }
        }
        for (v, a) in acc.iter().enumerate().take(nv) {
            _mm256_storeu_ps(po.add(c0 + 8 * v), *a);
        }
        c0 += 8 * nv;
    }
    for (s, &w) in p.iter().enumerate() {
        if w != 0.0 {
            let w = w / sum;
            for t in whole..d {
                o[t] += w * values[s * d + t];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::x86::{axpy_avx512, dot_avx512};
    use crate::kernels::pseudo;
    use crate::kernels::simd::{test_levels, Level};

    fn avx512() -> bool {
        test_levels("attention rows").contains(&Level::Avx512)
    }

    type Dots = unsafe fn(&[f32], &[f32], usize, &mut [f32; 16]);
    type Dot = unsafe fn(&[f32], &[f32]) -> f32;
    type Weighted = unsafe fn(&[f32], f32, &[f32], &mut [f32]);
    type Axpy = unsafe fn(f32, &[f32], &mut [f32]);

    /// Every block size 0-16 and head width `widths` (with and without tails): `dots` gives
    /// `dot`'s bits key by key, and `weighted` gives `axpy`'s, with weights holding zeros
    /// (skipped keys) and a sum that is not 1. The caller has checked the level's features.
    unsafe fn blocks_match(widths: &[usize], dots: Dots, dot: Dot, weighted: Weighted, axpy: Axpy) {
        for &d in widths {
            let q = pseudo(d, 1);
            let keys = pseudo(16 * d, 2);
            for n in 0..=16 {
                let mut got = [f32::NAN; 16];
                dots(&q, &keys, n, &mut got);
                for j in 0..16 {
                    let want = if j < n {
                        dot(&q, &keys[j * d..(j + 1) * d])
                    } else {
                        f32::NAN
                    };
                    assert_eq!(got[j].to_bits(), want.to_bits(), "d={d} n={n} key {j}");
                }
            }
            let s = 21;
            let mut p = pseudo(s, 3);
            for z in [0, 5, 6, 20] {
                p[z] = 0.0;
            }
            let values = pseudo(s * d, 4);
            let start = pseudo(d, 5);
            let (mut got, mut want) = (start.clone(), start);
            weighted(&p, 1.7, &values, &mut got);
            for (si, &w) in p.iter().enumerate() {
                if w != 0.0 {
                    axpy(w / 1.7, &values[si * d..(si + 1) * d], &mut want);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "d={d}");
        }
    }

    /// The AVX-512 blocks against `dot_avx512` and `axpy_avx512` (masked tails).
    #[test]
    fn blocks_equal_one_key_at_a_time() {
        if !avx512() {
            return;
        }
        let widths = [1, 7, 16, 17, 32, 48, 64, 80, 96, 128, 131, 256];
        // SAFETY: AVX-512F checked above.
        unsafe { blocks_match(&widths, dots16, dot_avx512, weighted_rows, axpy_avx512) };
    }

    /// The AVX2 blocks against `dot_avx2` and `axpy_avx2`, with widths that leave a scalar
    /// tail past the last 8.
    #[test]
    fn avx2_blocks_equal_one_key_at_a_time() {
        use crate::kernels::attention::x86::{axpy_avx2, dot_avx2};
        if !test_levels("attention rows").contains(&Level::Avx2) {
            return;
        }
        let widths = [
            1, 7, 8, 9, 16, 17, 24, 32, 48, 64, 72, 80, 96, 128, 131, 256,
        ];
        // SAFETY: AVX2 and FMA checked above.
        unsafe {
            blocks_match(
                &widths,
                dots16_avx2,
                dot_avx2,
                weighted_rows_avx2,
                axpy_avx2,
            )
        };
    }
}
