//! `x · wᵀ` for a decode step's many rows (a batch of 17-128 sequences) on AVX-512, with the
//! weight read in place: x is transposed once into `[k, mp]` (mp: m rounded up to 16, the
//! padding zero), and each step of the sum broadcasts one value of six weight rows against up
//! to 64 rows of x held in four vectors (twelve rows against 32), 24 accumulators in all.
//!
//! The gemm crate's x-left path (`gemm::matmul_xwt`) does the same product with its own
//! microkernel and threading. At 64 rows on the 2-core Xeon it ran a decode step's 30 layers at
//! 139-164 GFLOP/s, against a 345 GFLOP/s FMA peak; here every weight row is streamed once
//! per call, no operand is packed, and the output is written in place. At 17-32 rows it
//! replaces the small-rows kernel's four-row tile, which reduces 16 accumulators across lanes
//! for every 4 x 4 outputs.
//!
//! Each output is one FMA chain over k in order, from zero: the scalar reference is
//! `mul_add` in a loop, equal to the bit (tests).

use crate::kernels::matmul_small::WeightRows;
use rayon::prelude::*;

/// Accumulators a block holds: 24 of the 32 vector registers, the rest for x's vectors and
/// the broadcast. Blocks take six weight rows against up to four vectors of x (64 rows), or
/// twelve against up to two where x has at most 32 rows: every weight value loaded then
/// serves as many FMAs as there are vectors of x, so few rows want more weight rows.
const ACC: usize = 24;

/// `x [m, k] · wᵀ` for the weight rows `rows` serves (`[n, k]`): `[m, n]`. The caller has
/// checked that the CPU runs AVX-512 F.
pub(crate) fn xwt<R: WeightRows>(x: &[f32], m: usize, k: usize, rows: &R, n: usize) -> Vec<f32> {
    assert!(x.len() >= m * k, "bcast::xwt: the input is too short");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mp = m.div_ceil(16) * 16;
    // xᵀ in a buffer the calling thread keeps: a fresh one of this size (147 KB at 64 x 576)
    // is a new mapping, faulted in page by page on every call.
    thread_local! {
        static XT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    XT.with(|cell| {
        let (mut kept, mut own);
        let xt: &mut Vec<f32> = match cell.try_borrow_mut() {
            Ok(buf) => {
                kept = buf;
                &mut kept
            }
            // A call nested in another on this thread (work stolen while it waits) takes its
            // own.
            Err(_) => {
                own = Vec::new();
                &mut own
            }
        };
        transposed(x, m, k, mp, xt);
        by_rows(xt, m, mp, k, rows, n)
    })
}

/// The block shape for m rows (see `ACC`).
fn by_rows<R: WeightRows>(
    xt: &[f32],
    m: usize,
    mp: usize,
    k: usize,
    rows: &R,
    n: usize,
) -> Vec<f32> {
    if mp <= 32 {
        product::<R, 12>(xt, m, mp, k, rows, n)
    } else {
        product::<R, 6>(xt, m, mp, k, rows, n)
    }
}

/// `xwt` given xᵀ (`[k, mp]`), NR weight rows a block.
fn product<R: WeightRows, const NR: usize>(
    xt: &[f32],
    m: usize,
    mp: usize,
    k: usize,
    rows: &R,
    n: usize,
) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    // A thread per band of whole blocks; narrow outputs stay on one thread.
    let blocks = n.div_ceil(NR);
    let bands = threads.min(blocks.div_ceil(8)).max(1);
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = crate::kernels::SharedMut(y.as_mut_ptr());
    (0..bands).into_par_iter().for_each(|b| {
        let (first, last) = (blocks * b / bands, blocks * (b + 1) / bands);
        let mut widened = vec![0f32; if R::WIDENS { NR * k } else { 0 }];
        for blk in first..last {
            let j0 = blk * NR;
            let nr = NR.min(n - j0);
            let w: &[f32] = if R::WIDENS {
                for (r, buf) in widened.chunks_exact_mut(k).take(nr).enumerate() {
                    rows.widen(j0 + r, buf);
                }
                &widened[..nr * k]
            } else {
                rows.direct_rows(j0, nr, k)
            };
            // A short block repeats its last row; its sums are dropped below.
            let wp: [*const f32; NR] = std::array::from_fn(|r| w[r.min(nr - 1) * k..].as_ptr());
            // The next block's rows on their way to L1 while this one runs (f32 rows read in
            // place; the first pass over the rows takes it).
            let next = (!R::WIDENS && j0 + 2 * NR <= n)
                .then(|| std::array::from_fn(|r| w[r * k..].as_ptr().wrapping_add(NR * k)));
            let mut m0 = 0;
            while m0 < m {
                let next = if m0 == 0 { next } else { None };
                let vs = (ACC / NR).min((mp - m0) / 16);
                let mut sums = [0f32; ACC * 16];
                // SAFETY: the caller checked AVX-512 F; xt holds k rows of mp values, so
                // columns m0..m0 + 16 vs are inside it, and every weight row holds k values.
                unsafe {
                    let xp = xt.as_ptr().add(m0);
                    match vs {
                        4 => block::<4, NR>(xp, mp, k, wp, next, &mut sums),
                        3 => block::<3, NR>(xp, mp, k, wp, next, &mut sums),
                        2 => block::<2, NR>(xp, mp, k, wp, next, &mut sums),
                        _ => block::<1, NR>(xp, mp, k, wp, next, &mut sums),
                    }
                }
                let stride = vs * 16;
                for i in 0..(m - m0).min(stride) {
                    // SAFETY: row m0 + i < m, columns j0..j0 + nr < n; the bands' blocks are
                    // disjoint column ranges.
                    let dst = unsafe { out.get().add((m0 + i) * n + j0) };
                    for r in 0..nr {
                        unsafe { *dst.add(r) = sums[r * stride + i] };
                    }
                }
                m0 += stride;
            }
        }
    });
    // SAFETY: the bands' blocks cover columns 0..n, and each block writes them in every row.
    unsafe { y.set_len(m * n) };
    y
}

/// `x [m, k]` as `[k, mp]`, rows m..mp zero, in 16 x 16 blocks transposed in registers (an
/// element-by-element transpose took 34 us at 64 x 576, a quarter of the product's time).
fn transposed(x: &[f32], m: usize, k: usize, mp: usize, xt: &mut Vec<f32>) {
    assert!(mp.is_multiple_of(16) && mp >= m && x.len() >= m * k);
    // Every value is written below (the blocks cover rows 0..k, columns 0..mp).
    xt.resize(k * mp, 0.0);
    for i0 in (0..m).step_by(16) {
        for p0 in (0..k).step_by(16) {
            // SAFETY: the caller of `xwt` checked AVX-512 F; rows i0..i0 + 16 <= mp of the
            // output and rows i0..min(i0 + 16, m) of x, columns within k, as asserted above.
            unsafe { transpose16(x, m, k, i0, p0, xt, mp) };
        }
    }
}

/// The block of x at rows i0.., columns p0.. (up to 16 of each) into `xt` at rows p0..,
/// columns i0..i0 + 16 (rows past m written as zeros).
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(
    x: &[f32],
    m: usize,
    k: usize,
    i0: usize,
    p0: usize,
    xt: &mut [f32],
    mp: usize,
) {
    use std::arch::x86_64::*;
    let (mi, kp) = (16.min(m - i0), 16.min(k - p0));
    let mask: __mmask16 = if kp == 16 { 0xFFFF } else { (1u16 << kp) - 1 };
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, ri) in r.iter_mut().enumerate().take(mi) {
        *ri = _mm512_maskz_loadu_ps(mask, x.as_ptr().add((i0 + i) * k + p0));
    }
    // Pairs of rows interleaved, then quads, within each 128-bit lane: u[4j + q] holds
    // column q + 4l of rows 4j..4j + 4 in lane l.
    let mut t = [_mm512_setzero_ps(); 16];
    for j in 0..8 {
        t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        u[4 * j] = _mm512_shuffle_ps::<0x44>(t[4 * j], t[4 * j + 2]);
        u[4 * j + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * j], t[4 * j + 2]);
        u[4 * j + 2] = _mm512_shuffle_ps::<0x44>(t[4 * j + 1], t[4 * j + 3]);
        u[4 * j + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * j + 1], t[4 * j + 3]);
    }
    // Then the lanes: v[q] = [col q rows 0-3, col q+8 rows 0-3, col q rows 4-7, col q+8 rows
    // 4-7], v[4 + q] the same for q + 4 and q + 12, v[8..] for rows 8-15; c[q] is column q.
    let mut v = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        v[q] = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        v[4 + q] = _mm512_shuffle_f32x4::<0xDD>(u[q], u[4 + q]);
        v[8 + q] = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        v[12 + q] = _mm512_shuffle_f32x4::<0xDD>(u[8 + q], u[12 + q]);
    }
    let mut c = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        c[q] = _mm512_shuffle_f32x4::<0x88>(v[q], v[8 + q]);
        c[q + 8] = _mm512_shuffle_f32x4::<0xDD>(v[q], v[8 + q]);
        c[q + 4] = _mm512_shuffle_f32x4::<0x88>(v[4 + q], v[12 + q]);
        c[q + 12] = _mm512_shuffle_f32x4::<0xDD>(v[4 + q], v[12 + q]);
    }
    for (p, cp) in c.iter().enumerate().take(kp) {
        _mm512_storeu_ps(xt.as_mut_ptr().add((p0 + p) * mp + i0), *cp);
    }
}

/// NR weight rows against `VS` vectors of xᵀ's columns (NR VS <= `ACC`):
/// `sums[r * 16 VS + i]` is the dot of weight row r with column i. Every sum is one FMA chain
/// over k in order, from zero.
#[target_feature(enable = "avx512f")]
unsafe fn block<const VS: usize, const NR: usize>(
    xt: *const f32,
    mp: usize,
    k: usize,
    w: [*const f32; NR],
    next: Option<[*const f32; NR]>,
    sums: &mut [f32; ACC * 16],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); VS]; NR];
    for p in 0..k {
        if p % 16 == 0 {
            if let Some(next) = next {
                for q in next {
                    _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(p) as *const i8);
                }
            }
        }
        let row = xt.add(p * mp);
        let mut a = [_mm512_setzero_ps(); VS];
        for (v, av) in a.iter_mut().enumerate() {
            *av = _mm512_loadu_ps(row.add(16 * v));
        }
        for (accr, wr) in acc.iter_mut().zip(w) {
            let b = _mm512_set1_ps(*wr.add(p));
            for (c, av) in accr.iter_mut().zip(a) {
                *c = _mm512_fmadd_ps(av, b, *c);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (v, c) in accr.iter().enumerate() {
            _mm512_storeu_ps(sums.as_mut_ptr().add(r * VS * 16 + v * 16), *c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul_small::F32Rows;
    use crate::kernels::pseudo;

    /// One `mul_add` chain over k in order, from zero: what each sum of `xwt` must equal.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for p in 0..k {
                    s = x[i * k + p].mul_add(w[j * k + p], s);
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    /// Whether this CPU runs the kernel; `test_levels` names the skip (and fails it where
    /// `SAFETY_LAYERS_REQUIRE_SIMD` asks for AVX-512).
    fn runs_here() -> bool {
        crate::kernels::simd::test_levels("bcast").contains(&crate::kernels::simd::Level::Avx512)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every row-count class (one to four vectors in the last block, a partial vector, more
    /// than one block), short weight blocks, k not a multiple of 16, one band and several.
    #[test]
    fn equals_the_mul_add_chain_to_the_bit() {
        if !runs_here() {
            return;
        }
        for (m, k, n) in [
            (1, 5, 3),
            (16, 576, 6),
            (24, 576, 30),
            (32, 1536, 1100),
            (33, 576, 960),
            (48, 17, 7),
            (64, 576, 1100),
            (77, 1536, 576),
            (100, 40, 101),
            (128, 576, 49),
        ] {
            let (x, w) = (pseudo(m * k, 1), pseudo(n * k, 2));
            let got = xwt(&x, m, k, &F32Rows(&w), n);
            assert_eq!(
                bits(&got),
                bits(&reference(&x, m, k, &w, n)),
                "m={m} k={k} n={n}"
            );
        }
    }

    /// The register transpose against the definition, with partial blocks on both sides.
    #[test]
    fn transposes() {
        if !runs_here() {
            return;
        }
        for (m, k) in [(1usize, 1usize), (16, 16), (33, 40), (64, 576), (100, 17)] {
            let mp = m.div_ceil(16) * 16;
            let x = pseudo(m * k, 5);
            let mut got = vec![f32::NAN; 7];
            transposed(&x, m, k, mp, &mut got);
            for p in 0..k {
                for i in 0..mp {
                    let want = if i < m { x[i * k + p] } else { 0.0 };
                    assert_eq!(
                        got[p * mp + i].to_bits(),
                        want.to_bits(),
                        "m={m} k={k} p={p} i={i}"
                    );
                }
            }
        }
    }

    /// Widened rows (a dequantized or bf16 weight) give the f32 weight's bits.
    #[test]
    fn widened_rows_give_the_f32_weights_bits() {
        if !runs_here() {
            return;
        }
        use crate::kernels::CopiedRows as Copied;
        for (m, k, n) in [(20, 576, 37), (40, 1536, 1100), (64, 576, 965)] {
            let (x, w) = (pseudo(m * k, 3), pseudo(n * k, 4));
            let want = xwt(&x, m, k, &F32Rows(&w), n);
            let got = xwt(&x, m, k, &Copied(&w, k), n);
            assert_eq!(bits(&got), bits(&want), "m={m} k={k} n={n}");
        }
    }

    /// A decode step's projections of SmolLM2's 30 layers streamed from memory, here and on
    /// the gemm crate's x-left path, at a large batch's row counts: seven alternating pairs,
    /// the median of each.
    #[test]
    #[ignore]
    fn timing() {
        let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
        let ws: Vec<(usize, usize, Vec<f32>)> = (0..30 * shapes.len())
            .map(|i| {
                let (n, k) = shapes[i % shapes.len()];
                (n, k, pseudo(n * k, 2 + i as u64))
            })
            .collect();
        let median = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        for m in [16, 24, 32, 33, 48, 64, 96, 128] {
            let xs: Vec<Vec<f32>> = ws.iter().map(|(_, k, _)| pseudo(m * k, 1)).collect();
            let flop: usize = ws.iter().map(|(n, k, _)| 2 * m * n * k).sum();
            let (mut ours, mut theirs) = (vec![], vec![]);
            for _ in 0..7 {
                for mine in [true, false] {
                    let t = std::time::Instant::now();
                    for ((n, k, w), x) in ws.iter().zip(&xs) {
                        if mine {
                            std::hint::black_box(xwt(x, m, *k, &F32Rows(w), *n));
                        } else if m <= 32 {
                            let w = F32Rows(w);
                            let s = crate::kernels::matmul_small::small_rows(x, &w, m, *n, *k);
                            std::hint::black_box(s);
                        } else {
                            std::hint::black_box(crate::kernels::gemm::matmul_xwt(x, m, *k, w, *n));
                        }
                    }
                    let g = flop as f64 / t.elapsed().as_secs_f64() / 1e9;
                    if mine {
                        ours.push(g)
                    } else {
                        theirs.push(g)
                    }
                }
            }
            println!(
                "m={m}, 30 layers streamed, GFLOP/s median of 7: bcast {:.1}, {} {:.1}",
                median(ours),
                if m <= 32 {
                    "the small-rows tile"
                } else {
                    "matmul_xwt"
                },
                median(theirs)
            );
        }
    }
}
