//! `C (+)= A · B` on Intel AMX tiles (`tdpbf16ps`): operands rounded to bf16 as they are packed,
//! products summed in f32. This is the arithmetic of torch's bf16 autocast and of transformers'
//! bf16 inference on the same CPUs (oneDNN's AMX kernels), so it is used only where the caller
//! asked for bf16 compute: the `avx512bf16` SIMD level's prefill on bf16 weights, and bf16 mixed
//! precision training.
//!
//! Rust's AMX intrinsics and target features are unstable, so the tiles are driven with inline
//! assembly, and the kernel is reached only after `available()` has found AMX-TILE and AMX-BF16
//! in CPUID and Linux has granted the process the tile data state (`arch_prctl`).
//!
//! Layout: A is packed as 16-row x 32-column bf16 tiles, B as 16 K-pairs x 16 columns x 2
//! ("VNNI" order: `tdpbf16ps` multiplies A's element pair (i, 2p..2p+2) with B's pair at (p, j)),
//! each tile 1 KiB and contiguous, the K tiles of one block one after another. Each kernel call
//! computes a 32 x 32 block of C in the four tiles tmm0-3 from two A tiles (tmm4-5) and two B
//! tiles (tmm6-7) per step of K = 32.

use crate::kernels::gemm::Mat;
use crate::kernels::pack::{f32_row, round_into, round_up, Src};
use rayon::prelude::*;

/// Whether the AMX kernel can run here (checked once per process). A forced SIMD level below
/// AVX-512 (`SAFETY_LAYERS_SIMD=avx2` or `scalar`) turns it off too, so the fallbacks can be
/// tested on a machine that has AMX.
pub fn available() -> bool {
    use crate::kernels::simd::{level, Level};
    if !matches!(level(), Level::Avx512 | Level::Avx512Bf16) {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that reports AVX-512, and we only
            // read it; the syscall asks for a permission and changes nothing else.
            unsafe {
                let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
                let (tile, bf16) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 22) & 1 == 1);
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                tile && bf16
                    && libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    ) == 0
            }
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

const TILE: usize = 512; // bf16 elements in one 16 x 32 tile (1 KiB)

/// A `[m, k]`, packed: block `r` of 16 rows holds its `k/32` tiles in K order; rows and columns
/// past the matrix are zero. `m_pad` is a multiple of 32, `k_pad` of 32.
fn pack_a(a: Mat, m_pad: usize, k_pad: usize) -> Vec<u16> {
    let (m, k) = a.shape();
    let mut out = vec![0u16; m_pad * k_pad];
    out.par_chunks_mut(16 * k_pad)
        .enumerate()
        .for_each(|(blk, dst)| {
            let (i0, live) = (blk * 16, 16.min(m.saturating_sub(blk * 16)));
            if live == 0 {
                return; // a zero block past the matrix
            }
            if a.transposed {
                // Row i of A is column i of the stored [k, m] matrix (a gradient read
                // transposed): each stored row gives the block's values at one K position.
                let mut vals = [0u16; 16];
                for p in 0..k {
                    round_into(&a.data[p * a.cols + i0..][..live], &mut vals[..live]);
                    let tile = &mut dst[(p / 32) * TILE + p % 32..];
                    for (r, &v) in vals[..live].iter().enumerate() {
                        tile[r * 32] = v;
                    }
                }
            } else {
                // Rows contiguous: 32 values at a time into each tile's row.
                for r in 0..live {
                    for (t, chunk) in f32_row(&a, i0 + r).chunks(32).enumerate() {
                        round_into(chunk, &mut dst[t * TILE + r * 32..][..chunk.len()]);
                    }
                }
            }
        });
    out
}

/// B `[k, n]`, packed: block `c` of 16 columns holds its `k/32` tiles in K order, each tile 16
/// K-pairs x 16 columns x 2.
fn pack_b(b: Src, n_pad: usize, k_pad: usize) -> Vec<u16> {
    let (k, n) = b.shape();
    let mut out = vec![0u16; n_pad * k_pad];
    out.par_chunks_mut(16 * k_pad)
        .enumerate()
        .for_each(|(blk, dst)| {
            let cols = 16.min(n.saturating_sub(blk * 16));
            if cols == 0 {
                return; // a zero block past the matrix
            }
            if b.columns_contiguous() {
                // A weight [n, k] read transposed: one column at a time, its K pairs written
                // as 32-bit words down the tiles.
                let mut col = vec![0u16; k_pad];
                for c in 0..cols {
                    b.column_bits(blk * 16 + c, &mut col);
                    scatter_pairs(&col, dst, c);
                }
            } else {
                // Rows contiguous: two rows' 16-column segments rounded and interleaved.
                let (mut r0, mut r1) = ([0u16; 16], [0u16; 16]);
                for pair in 0..k.div_ceil(2) {
                    let p = 2 * pair;
                    b.row_bits(p, blk * 16, &mut r0[..cols]);
                    if p + 1 < k {
                        b.row_bits(p + 1, blk * 16, &mut r1[..cols]);
                    } else {
                        r1 = [0; 16];
                    }
                    let row = &mut dst[(p / 32) * TILE + ((p % 32) / 2) * 32..][..32];
                    for c in 0..cols {
                        row[2 * c] = r0[c];
                        row[2 * c + 1] = r1[c];
                    }
                }
            }
        });
    out
}

/// Column `c` of a block, `col` its K values (padded with zeros to the tiles' K), into the
/// block's tiles: pair q of tile t at row q, columns 2c..2c+2.
#[inline(always)]
fn scatter_pairs(col: &[u16], dst: &mut [u16], c: usize) {
    for (t, tile) in col.chunks_exact(32).enumerate() {
        let out = &mut dst[t * TILE..(t + 1) * TILE];
        for q in 0..16 {
            out[q * 32 + 2 * c] = tile[2 * q];
            out[q * 32 + 2 * c + 1] = tile[2 * q + 1];
        }
    }
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration (eight 16 x 64-byte tiles) on this thread, runs `f`, releases
/// the tiles.
fn with_tiles<T>(f: impl FnOnce() -> T) -> T {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // SAFETY: only reached after `available()`; the configuration is a valid palette-1 layout.
    unsafe {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack));
    }
    let out = f();
    // SAFETY: as above; releasing returns the tiles to their initial state.
    unsafe {
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
    out
}

/// One 32 x 32 block of C into `c` (row stride 32 f32) from `kt` K tiles of A's two row blocks
/// (`a0`, `a1`) and B's two column blocks (`b0`, `b1`).
///
/// # Safety
/// Tiles configured by `with_tiles`; each pointer has `kt` tiles (1 KiB each) behind it and `c`
/// 32 x 32 f32.
unsafe fn block_32x32(
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    kt: usize,
    c: *mut f32,
) {
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {s}]",
        "tileloadd tmm5, [{a1} + {s}]",
        "tileloadd tmm6, [{b0} + {s}]",
        "tileloadd tmm7, [{b1} + {s}]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 1024",
        "add {a1}, 1024",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {kt}",
        "jnz 2b",
        "tilestored [{c} + {cs}], tmm0",
        "tilestored [{c1} + {cs}], tmm1",
        "tilestored [{c2} + {cs}], tmm2",
        "tilestored [{c3} + {cs}], tmm3",
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a1 => _,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        kt = inout(reg) kt => _,
        s = in(reg) 64usize,
        c = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * 32),
        c3 = in(reg) c.add(16 * 32 + 16),
        cs = in(reg) 128usize,
        options(nostack)
    );
}

/// B packed once for several products (a weight used by every band of rows).
pub(crate) struct PackedB {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

impl PackedB {
    pub fn new(b: Src) -> PackedB {
        let (k, n) = b.shape();
        PackedB {
            data: pack_b(b, round_up(n.max(1), 32), round_up(k.max(1), 32)),
            k,
            n,
        }
    }
}

/// `matmul_packed` with B packed here (the tests).
#[cfg(test)]
pub(crate) fn matmul(dst: &mut [f32], dst_stride: usize, a: Mat, b: Src, accumulate: bool) {
    let (k, k2) = (a.shape().1, b.shape().0);
    assert_eq!(k, k2, "amx: inner dimensions {k} and {k2} differ");
    matmul_packed(dst, dst_stride, a, &PackedB::new(b), accumulate)
}

/// `dst [m, n] (+)= a [m, k] · b [k, n]` in bf16 x bf16 -> f32 on AMX tiles, threaded on rayon.
/// `dst` is row-major with row stride `dst_stride` (>= n). Callers check `available()`.
pub(crate) fn matmul_packed(
    dst: &mut [f32],
    dst_stride: usize,
    a: Mat,
    b: &PackedB,
    accumulate: bool,
) {
    let ((m, k), n) = (a.shape(), b.n);
    assert_eq!(k, b.k, "amx: inner dimensions {k} and {} differ", b.k);
    assert!(n <= dst_stride && (m == 0 || dst.len() >= (m - 1) * dst_stride + n));
    assert!(
        available(),
        "amx: the kernel was called on a CPU without AMX"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (m_pad, k_pad) = (round_up(m, 32), round_up(k.max(1), 32));
    let kt = k_pad / 32;
    let (pa, pb) = (pack_a(a, m_pad, k_pad), &b.data);
    let nb = round_up(n, 32) / 32;
    // Each task owns 32 whole rows of dst (so writes never overlap) and sweeps the column
    // blocks under them; B's blocks are shared read-only.
    let tasks: Vec<(usize, &mut [f32])> = dst
        .chunks_mut(32 * dst_stride)
        .take(m_pad / 32)
        .enumerate()
        .collect();
    tasks.into_par_iter().for_each(|(bi, rows)| {
        with_tiles(|| {
            let mut c = [0f32; 32 * 32];
            let a0 = pa[(2 * bi) * kt * TILE..].as_ptr();
            let a1 = pa[(2 * bi + 1) * kt * TILE..].as_ptr();
            let live_rows = (m - bi * 32).min(32);
            for bj in 0..nb {
                let b0 = pb[(2 * bj) * kt * TILE..].as_ptr();
                let b1 = pb[(2 * bj + 1) * kt * TILE..].as_ptr();
                // SAFETY: the packed buffers hold kt tiles per 16-row/column block, and c is
                // 32 x 32; tiles were configured by with_tiles.
                unsafe { block_32x32(a0, a1, b0, b1, kt, c.as_mut_ptr()) };
                let cols = (n - bj * 32).min(32);
                for r in 0..live_rows {
                    let out = &mut rows[r * dst_stride + bj * 32..][..cols];
                    let got = &c[r * 32..r * 32 + cols];
                    if accumulate {
                        out.iter_mut().zip(got).for_each(|(o, g)| *o += g);
                    } else {
                        out.copy_from_slice(got);
                    }
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pack::check_bf16_product;
    use crate::kernels::pseudo;

    /// Every operand form the callers use, shapes with tails in M, N and K
    /// (`pack::check_bf16_product`).
    #[test]
    fn equals_f64_math_on_bf16_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU (or kernel) has no AMX");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (33, 70, 47),
            (64, 576, 96),
            (433, 100, 31),
        ];
        check_bf16_product(&shapes, &|d, s, a, b, acc, _| matmul(d, s, a, b, acc));
    }

    /// GFLOP/s of the training shapes (SmolLM2, 433 rows), packing included, against the f32
    /// gemm: `cargo test -p sl-engine --release --lib kernels::amx -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        if !available() {
            eprintln!("skipped: no AMX");
            return;
        }
        let rows = crate::kernels::TRAINING_ROWS;
        for (inp, out) in crate::kernels::TRAINING_SHAPES {
            let x = pseudo(rows * inp, 1);
            let w = pseudo(out * inp, 2);
            let mut y = vec![0f32; rows * out];
            let flops = 2.0 * (rows * inp * out) as f64;
            let time = |f: &mut dyn FnMut()| crate::kernels::gflops(flops, f);
            let (xm, wm) = (Mat::new(&x, rows, inp), Mat::new(&w, out, inp));
            let f32_gemm =
                time(&mut || crate::kernels::gemm::matmul(&mut y, out, xm, wm.t(), false, true));
            let amx = time(&mut || matmul(&mut y, out, xm, Src::F32(wm.t()), false));
            let (mp, np, kp) = (round_up(rows, 32), round_up(out, 32), round_up(inp, 32));
            let t = std::time::Instant::now();
            let pa = pack_a(xm, mp, kp);
            let pb = pack_b(Src::F32(wm.t()), np, kp);
            let pack_ms = t.elapsed().as_secs_f64() * 1e3;
            let _ = (pa.len(), pb.len());
            eprintln!("[{rows}x{inp}] x [{inp}x{out}]: f32 gemm {f32_gemm:.0} GFLOP/s, amx {amx:.0} (packing {pack_ms:.2} ms = {:.0} GFLOP/s)", flops / pack_ms / 1e6);
        }
    }
}
