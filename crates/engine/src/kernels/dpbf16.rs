//! `C (+)= A · B` with AVX-512 BF16's `vdpbf16ps`: operands rounded to bf16 as they are packed,
//! products summed in pairs into f32. The same arithmetic as `amx` (and as torch's bf16
//! autocast), for the CPUs with AVX-512 BF16 and no AMX tiles (AMD Zen 4 and later, Intel
//! Cooper Lake): there one `vdpbf16ps` does 32 multiply-adds where an f32 FMA does 16. Used where
//! the caller asked for bf16 compute (the `avx512bf16` level's prefill on bf16 weights, bf16 mixed
//! precision training) and AMX is absent.
//!
//! Layout: A is packed in blocks of `MR` rows, each block's K pairs one after another (the `MR`
//! rows' pairs of one K position as `MR` 32-bit words); B in blocks of `NR` columns, each K pair
//! an `NR`-word row (one word per column: its two bf16 values at K = 2p, 2p + 1). The kernel
//! keeps an `MR` x `NR` block of C in 24 registers and per K pair broadcasts each row's word of
//! A against four vectors of B. K is walked in slices of `KC` pairs so that a slice of A's block
//! stays in L1 while the slices of B's blocks one task sweeps stay in L2.

use crate::kernels::gemm::Mat;
use crate::kernels::pack::{bf16_bits, f32_row, round_into, Src};
use rayon::prelude::*;

const MR: usize = 6;
const NR: usize = 64;
const KC: usize = 256;
/// Rows of C per task (16 of A's blocks: 96 rows x KC pairs of A is 96 KiB).
const TASK_ROWS: usize = 16 * MR;
/// Bytes of B's blocks one task sweeps per K slice, at most (kept in L2).
const TASK_B_BYTES: usize = 256 * 1024;

/// Whether the kernel can run here: the CPU has AVX-512 BF16 and no lower SIMD level was forced
/// (`SAFETY_LAYERS_SIMD=avx2` turns it off, so the fallbacks can be tested on this CPU).
pub fn available() -> bool {
    use crate::kernels::simd::{choice, Level};
    let c = choice();
    c.cpu.bf16 && matches!(c.active, Level::Avx512 | Level::Avx512Bf16)
}

/// Two bf16 bit patterns as one word: `lo` at the lower K position.
#[inline(always)]
fn word(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// A `[m, k]` packed in blocks of `MR` rows (`kp` pairs each; rows and K past the matrix zero).
fn pack_a(a: Mat, kp: usize) -> Vec<u32> {
    let (m, k) = a.shape();
    let mut out = vec![0u32; m.div_ceil(MR) * kp * MR];
    out.par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(blk, dst)| {
            let (i0, live) = (blk * MR, MR.min(m - blk * MR));
            if a.transposed {
                // Row i of A is column i of the stored [k, m] matrix: each stored row gives
                // the block's values at one K position (a half of each word).
                let mut vals = [0u16; MR];
                for q in 0..k {
                    round_into(&a.data[q * a.cols + i0..][..live], &mut vals[..live]);
                    let shift = 16 * (q % 2);
                    for (w, &v) in dst[(q / 2) * MR..][..live].iter_mut().zip(&vals) {
                        *w |= (v as u32) << shift;
                    }
                }
            } else {
                let mut row = vec![0u16; 2 * kp];
                for r in 0..live {
                    round_into(f32_row(&a, i0 + r), &mut row[..k]);
                    for (p, pair) in row.chunks_exact(2).enumerate() {
                        dst[p * MR + r] = word(pair[0], pair[1]);
                    }
                }
            }
        });
    out
}

/// B packed once for several products (a weight used by every band of rows).
pub(crate) struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
    kp: usize,
}

impl PackedB {
    pub fn new(b: Src) -> PackedB {
        let (k, n) = b.shape();
        let kp = k.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(NR) * kp * NR];
        data.par_chunks_mut((kp * NR).max(1))
            .enumerate()
            .for_each(|(blk, dst)| {
                let (j0, cols) = (blk * NR, NR.min(n - blk * NR));
                if b.columns_contiguous() {
                    // A weight [n, k] read transposed: one column at a time.
                    let mut col = vec![0u16; 2 * kp];
                    for c in 0..cols {
                        b.column_bits(j0 + c, &mut col);
                        for (p, pair) in col.chunks_exact(2).enumerate() {
                            dst[p * NR + c] = word(pair[0], pair[1]);
                        }
                    }
                } else {
                    // Rows contiguous: two rows' segments rounded and interleaved in one
                    // pass (a loop that vectorises).
                    for (p, out) in dst.chunks_exact_mut(NR).enumerate() {
                        let r0 = &b.row(2 * p)[j0..j0 + cols];
                        if 2 * p + 1 < k {
                            let r1 = &b.row(2 * p + 1)[j0..j0 + cols];
                            for ((o, &x0), &x1) in out.iter_mut().zip(r0).zip(r1) {
                                *o = word(bf16_bits(x0), bf16_bits(x1));
                            }
                        } else {
                            for (o, &x0) in out.iter_mut().zip(r0) {
                                *o = bf16_bits(x0) as u32;
                            }
                        }
                    }
                }
            });
        PackedB { data, k, n, kp }
    }
}

/// `matmul_packed` with B packed here (the tests).
#[cfg(test)]
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    a: Mat,
    b: Src,
    accumulate: bool,
    parallel: bool,
) {
    let (k, k2) = (a.shape().1, b.shape().0);
    assert_eq!(k, k2, "dpbf16: inner dimensions {k} and {k2} differ");
    matmul_packed(dst, dst_stride, a, &PackedB::new(b), accumulate, parallel)
}

/// The destination's rows, written by tasks that each own a disjoint rectangle of it.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    stride: usize,
}
// SAFETY: tasks write disjoint rectangles (see `matmul_packed`), and the slice outlives them.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// `len` values of row `row` from column `col`.
    ///
    /// # Safety
    /// Inside the destination, and no other live slice overlaps them.
    unsafe fn segment<'a>(self, row: usize, col: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.add(row * self.stride + col), len)
    }
}

/// `dst [m, n] (+)= a [m, k] · b [k, n]` in bf16 x bf16 -> f32, threaded on rayon when
/// `parallel`. `dst` is row-major with row stride `dst_stride` (>= n). Callers check
/// `available()`.
pub(crate) fn matmul_packed(
    dst: &mut [f32],
    dst_stride: usize,
    a: Mat,
    b: &PackedB,
    accumulate: bool,
    parallel: bool,
) {
    let ((m, k), n) = (a.shape(), b.n);
    assert_eq!(k, b.k, "dpbf16: inner dimensions {k} and {} differ", b.k);
    assert!(a.data.len() >= a.rows * a.cols);
    assert!(n <= dst_stride && (m == 0 || dst.len() >= (m - 1) * dst_stride + n));
    assert!(
        available(),
        "dpbf16: the kernel was called on a CPU without AVX-512 BF16"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_stride).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    let kp = b.kp;
    let pa = pack_a(a, kp);
    let (mb, nb) = (m.div_ceil(MR), n.div_ceil(NR));
    // Tasks: TASK_ROWS rows by as many column blocks as keep one K slice of them in L2, fewer
    // when that would leave too few tasks to balance the threads.
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let row_tasks = mb.div_ceil(TASK_ROWS / MR);
    let cap = (TASK_B_BYTES / (KC.min(kp) * NR * 4)).max(1);
    let per_task = cap
        .min(nb.div_ceil((4 * threads).div_ceil(row_tasks)))
        .max(1);
    let tasks: Vec<(usize, usize)> = (0..row_tasks)
        .flat_map(|rt| (0..nb.div_ceil(per_task)).map(move |ct| (rt, ct)))
        .collect();
    let out = Dst {
        ptr: dst.as_mut_ptr(),
        stride: dst_stride,
    };
    let run = |(rt, ct): (usize, usize)| {
        let blocks_r = rt * (TASK_ROWS / MR)..mb.min((rt + 1) * (TASK_ROWS / MR));
        let blocks_c = ct * per_task..nb.min((ct + 1) * per_task);
        let mut c = [0f32; MR * NR];
        for p0 in (0..kp).step_by(KC) {
            let len = KC.min(kp - p0);
            let add = accumulate || p0 > 0;
            for rb in blocks_r.clone() {
                let pa = &pa[(rb * kp + p0) * MR..][..len * MR];
                let rows = MR.min(m - rb * MR);
                for cb in blocks_c.clone() {
                    let pb = &b.data[(cb * kp + p0) * NR..][..len * NR];
                    // SAFETY: available() was checked above; pa holds len x MR words, pb
                    // len x NR, c is MR x NR.
                    unsafe { x86::kernel(pa.as_ptr(), pb.as_ptr(), len, &mut c) };
                    let cols = NR.min(n - cb * NR);
                    for (r, got) in c.chunks_exact(NR).take(rows).enumerate() {
                        // SAFETY: row rb*MR + r < m and columns cb*NR.. < n are inside dst (the
                        // asserts above); no other task owns this row block and column block.
                        let o = unsafe { out.segment(rb * MR + r, cb * NR, cols) };
                        if add {
                            o.iter_mut().zip(got).for_each(|(o, g)| *o += g);
                        } else {
                            o.copy_from_slice(&got[..cols]);
                        }
                    }
                }
            }
        }
    };
    if parallel {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}

mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// One `MR` x `NR` block of C into `c` (row stride `NR`) from `len` K pairs of an A block
    /// (`MR` words per pair) and a B block (`NR` words per pair).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `a` has `len * MR` words, `b` `len * NR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn kernel(a: *const u32, b: *const u32, len: usize, c: &mut [f32; MR * NR]) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        for p in 0..len {
            let bp = b.add(p * NR) as *const __m512i;
            let bv: [__m512bh; 4] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(1))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(2))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(3))),
            ];
            let ap = a.add(p * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let av =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ap.add(r) as i32));
                for (v, b) in acc.iter_mut().zip(&bv) {
                    *v = _mm512_dpbf16_ps(*v, av, *b);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, x) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.as_mut_ptr().add(r * NR + 16 * v), *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pack::check_bf16_product;
    use crate::kernels::pseudo;

    /// Skips (saying so) where the CPU lacks AVX-512 BF16, and fails there instead when
    /// SAFETY_LAYERS_REQUIRE_SIMD=avx512bf16 says this machine has it.
    fn runs_here() -> bool {
        if available() {
            return true;
        }
        let required = std::env::var("SAFETY_LAYERS_REQUIRE_SIMD").unwrap_or_default();
        assert!(
            !required.split(',').any(|l| l.trim() == "avx512bf16"),
            "SAFETY_LAYERS_REQUIRE_SIMD names avx512bf16 but the dpbf16 kernel cannot run here"
        );
        eprintln!("skipped: this CPU has no AVX-512 BF16 (or a lower level was forced)");
        false
    }

    /// Every operand form the callers use (`pack::check_bf16_product`), shapes with tails in M,
    /// N and K, several K slices and tasks, odd K, threaded and not.
    #[test]
    fn equals_f64_math_on_bf16_rounded_operands() {
        if !runs_here() {
            return;
        }
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (13, 70, 65),
            (64, 576, 96),
            (200, 1101, 130),
            (7, 64, 700),
        ];
        check_bf16_product(&shapes, &|d, s, a, b, acc, call| {
            matmul(d, s, a, b, acc, call % 3 != 0)
        });
    }

    /// GFLOP/s of the training shapes (SmolLM2, 433 rows), packing included, against the f32
    /// gemm: `cargo test -p sl-engine --release --lib kernels::dpbf16 -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        if !runs_here() {
            return;
        }
        let rows = crate::kernels::TRAINING_ROWS;
        // Plus the head's input gradient (below).
        for (inp, out) in crate::kernels::TRAINING_SHAPES
            .into_iter()
            .chain([(49152, 576)])
        {
            let (rows, inp, out) = if inp == 49152 {
                (64, inp, out) // the head's input gradient, one band of rows
            } else {
                (rows, inp, out)
            };
            let x = pseudo(rows * inp, 1);
            let w = pseudo(out * inp, 2);
            let mut y = vec![0f32; rows * out];
            let flops = 2.0 * (rows * inp * out) as f64;
            let time = |f: &mut dyn FnMut()| crate::kernels::gflops(flops, f);
            // The head's input gradient reads the head [vocab, hidden] as it is stored.
            let (xm, wm) = if inp == 49152 {
                (Mat::new(&x, rows, inp), Mat::new(&w, inp, out).t())
            } else {
                (Mat::new(&x, rows, inp), Mat::new(&w, out, inp))
            };
            let f32_gemm =
                time(&mut || crate::kernels::gemm::matmul(&mut y, out, xm, wm.t(), false, true));
            let packed = PackedB::new(Src::F32(wm.t()));
            let bf16 = time(&mut || matmul_packed(&mut y, out, xm, &packed, false, true));
            let t = std::time::Instant::now();
            let _ = PackedB::new(Src::F32(wm.t()));
            let pack_ms = t.elapsed().as_secs_f64() * 1e3;
            eprintln!("[{rows}x{inp}] x [{inp}x{out}]: f32 gemm {f32_gemm:.0} GFLOP/s, dpbf16 {bf16:.0} with B packed (packing B: {pack_ms:.2} ms)");
        }
    }
}
