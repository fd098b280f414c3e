//! A bounds-checked front for the `gemm` crate (the GEMM candle's CPU backend uses), for the
//! training ops that multiply slices they own: strides let one call read an operand transposed
//! without copying it, and `accumulate` adds into the destination (gradient accumulation in
//! place).

use crate::kernels::matmul_small::{F32Rows, WeightRows};
use rayon::prelude::*;

/// A row-major `[rows, cols]` matrix in a slice (rows `stride` apart), read either as it is or
/// transposed.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub transposed: bool,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            stride: cols,
            transposed: false,
        }
    }

    pub fn t(self) -> Self {
        Mat {
            transposed: !self.transposed,
            ..self
        }
    }

    /// The shape as read.
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Element (i, j) of the matrix as read (the tests' reference products).
    #[cfg(test)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        if self.transposed {
            self.data[j * self.stride + i]
        } else {
            self.data[i * self.stride + j]
        }
    }

    /// (column stride, row stride) of the matrix as read.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (self.stride as isize, 1)
        } else {
            (1, self.stride as isize)
        }
    }

    /// Whether `data` holds every element (the last row may end before the stride does).
    fn fits(&self) -> bool {
        self.stride >= self.cols
            && (self.rows == 0 || self.data.len() >= (self.rows - 1) * self.stride + self.cols)
    }

    /// Columns `start..end` of the matrix as read.
    fn columns(self, start: usize, end: usize) -> Self {
        if self.transposed {
            Mat {
                data: &self.data[start * self.stride..],
                rows: end - start,
                ..self
            }
        } else {
            Mat {
                data: &self.data[start..],
                cols: end - start,
                ..self
            }
        }
    }
}

/// The arithmetic of a training matmul.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// bf16 mixed precision: both operands rounded to bf16, products summed in f32 (torch's
    /// bf16 autocast of a linear layer).
    Bf16,
}

/// `matmul` in `precision`. bf16 runs on AMX tiles where the CPU has them, else on AVX-512
/// BF16's `vdpbf16ps` where it has that; elsewhere the same arithmetic on the f32 gemm, on
/// copies of the operands rounded to bf16 (no faster than f32 there, but the same numbers on
/// every CPU up to the order of the f32 sums).
pub(crate) fn matmul_in(
    precision: Precision,
    dst: &mut [f32],
    dst_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    matmul_rhs(
        dst,
        dst_stride,
        a,
        &Rhs::new(precision, b),
        accumulate,
        parallel,
    )
}

/// `a · b` in `precision` into a fresh `[m, n]` buffer; in f32 not zeroed first (`matmul_new`).
pub(crate) fn matmul_in_new(precision: Precision, a: Mat, b: Mat, parallel: bool) -> Vec<f32> {
    if precision == Precision::F32 {
        return matmul_new(a, b, parallel);
    }
    let n = b.shape().1;
    let mut out = vec![0f32; a.shape().0 * n];
    matmul_in(precision, &mut out, n, a, b, false, parallel);
    out
}

/// A right-hand operand prepared once for several products in one precision: as it is (f32),
/// packed into AMX tiles or into `vdpbf16ps` pairs, or rounded to bf16 values (bf16 on a CPU
/// with neither).
pub(crate) enum Rhs<'a> {
    F32(Mat<'a>),
    #[cfg(target_arch = "x86_64")]
    Tiles(crate::kernels::amx::PackedB),
    #[cfg(target_arch = "x86_64")]
    Pairs(crate::kernels::dpbf16::PackedB),
    Rounded(Vec<f32>, Mat<'a>),
}

impl<'a> Rhs<'a> {
    pub fn new(precision: Precision, b: Mat<'a>) -> Rhs<'a> {
        if precision == Precision::F32 {
            return Rhs::F32(b);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = Rhs::packed_bf16(crate::kernels::pack::Src::F32(b)) {
            return packed;
        }
        Rhs::Rounded(rounded(&b), b)
    }

    /// `b` packed for this CPU's bf16 product kernel: AMX tiles where it has them, else
    /// `vdpbf16ps` pairs where it has AVX-512 BF16; None where it has neither.
    #[cfg(target_arch = "x86_64")]
    pub fn packed_bf16(b: crate::kernels::pack::Src) -> Option<Rhs<'static>> {
        use crate::kernels::{amx, dpbf16};
        if amx::available() {
            Some(Rhs::Tiles(amx::PackedB::new(b)))
        } else if dpbf16::available() {
            Some(Rhs::Pairs(dpbf16::PackedB::new(b)))
        } else {
            None
        }
    }
}

/// The matrix's values rounded to bf16 (kept in f32).
fn rounded(m: &Mat) -> Vec<f32> {
    assert_eq!(m.stride, m.cols, "rounded: a band of a wider matrix");
    m.data[..m.rows * m.cols]
        .par_iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// `dst (+)= a · b` with b prepared by `Rhs::new` (a rounded to bf16 too when b was).
pub(crate) fn matmul_rhs(
    dst: &mut [f32],
    dst_stride: usize,
    a: Mat,
    b: &Rhs,
    accumulate: bool,
    parallel: bool,
) {
    match b {
        Rhs::F32(b) => matmul(dst, dst_stride, a, *b, accumulate, parallel),
        #[cfg(target_arch = "x86_64")]
        Rhs::Tiles(p) => {
            use crate::kernels::amx::matmul_packed;
            matmul_packed(dst, dst_stride, a, p, accumulate)
        }
        #[cfg(target_arch = "x86_64")]
        Rhs::Pairs(p) => {
            crate::kernels::dpbf16::matmul_packed(dst, dst_stride, a, p, accumulate, parallel)
        }
        Rhs::Rounded(values, b) => {
            let ra = rounded(&a);
            let (a2, b2) = (Mat { data: &ra, ..a }, Mat { data: values, ..*b });
            matmul(dst, dst_stride, a2, b2, accumulate, parallel)
        }
    }
}

/// `dst [m, n] (+)= a [m, k] · b [k, n]`, threaded on rayon when `parallel`. `dst` is row-major
/// with row stride `dst_stride` (>= n), so a call may fill a column band of a wider matrix.
///
/// With `b` transposed (`x · Wᵀ`, a linear layer's forward) the threads split `dst`'s columns,
/// each a band with a one-thread gemm: for that operand layout the gemm crate packs the whole
/// weight on the calling thread while its other threads wait (it transposes the problem to a
/// row-major left operand, which it prepacks whole when it has at most 2 x 512 rows), which
/// cost a prefill up to 40% of those products' time here. Other layouts keep the crate's own
/// threading (it packs in its threads there, and is faster than bands for the gradients).
/// The sums run in the same order either way (bands split only the columns), so the result is
/// the same to the bit.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: a slice of initialised values, `dst.len()` long.
    unsafe {
        matmul_raw(
            dst.as_mut_ptr(),
            dst.len(),
            dst_stride,
            a,
            b,
            accumulate,
            parallel,
        )
    }
}

/// `a · b` into a fresh `[m, n]` buffer that is not zeroed first (the product writes every
/// element without reading it): a prefill's outputs are megabytes per projection.
pub(crate) fn matmul_new(a: Mat, b: Mat, parallel: bool) -> Vec<f32> {
    let (m, n) = (a.shape().0, b.shape().1);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds m * n values; with `accumulate` false gemm only writes dst
    // (its `read_dst` flag), and the k = 0 case writes zeros, so all m * n are set below.
    unsafe {
        matmul_raw(out.as_mut_ptr(), m * n, n, a, b, false, parallel);
        out.set_len(m * n);
    }
    out
}

/// `matmul` on `dst_len` values at `dst`, which must be initialised when `accumulate`.
unsafe fn matmul_raw(
    dst: *mut f32,
    dst_len: usize,
    dst_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    let ((m, k), (k2, n)) = (a.shape(), b.shape());
    assert_eq!(k, k2, "gemm: inner dimensions {k} and {k2} differ");
    assert!(
        a.fits() && b.fits(),
        "gemm: an operand's slice is too short"
    );
    assert!(n <= dst_stride && (m == 0 || dst_len >= (m - 1) * dst_stride + n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: row r's n values lie inside the bounds asserted above.
                unsafe { std::ptr::write_bytes(dst.add(r * dst_stride), 0, n) };
            }
        }
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    if threads == 1 || !b.transposed || n < threads * MIN_BAND {
        let par = if threads == 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        // SAFETY: the asserts above bound every element gemm reads and writes.
        unsafe { call(dst, dst_stride, a, b, accumulate, par) };
        return;
    }
    let out = crate::kernels::SharedMut(dst);
    (0..threads).into_par_iter().for_each(|i| {
        let (start, end) = band(n, threads, i);
        // SAFETY: the bands are disjoint column ranges of dst, inside the bounds asserted above.
        unsafe {
            call(
                out.get().add(start),
                dst_stride,
                a,
                b.columns(start, end),
                accumulate,
                gemm::Parallelism::None,
            )
        };
    });
}

/// `x [M, K] · wᵀ` for `w [N, K]`, both contiguous f32 CPU tensors outside autograd (inference):
/// `[M, N]` on the threaded `matmul`. None when they do not qualify (the caller falls back to
/// candle's matmul, which runs the same gemm with the crate's own threading).
pub fn linear_f32(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> anyhow::Result<Option<candle_core::Tensor>> {
    use crate::kernels::matmul_small::with_f32;
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    anyhow::ensure!(
        k == k2,
        "linear: input has {k} features, the weight expects {k2}"
    );
    if x.track_op() || w.track_op() {
        return Ok(None);
    }
    let y = with_f32(x, |xv| {
        with_f32(w, |wv| {
            if m <= XWT_MAX_ROWS {
                xwt_rows(xv, m, k, &F32Rows(wv), n)
            } else {
                matmul_new(Mat::new(xv, m, k), Mat::new(wv, n, k).t(), true)
            }
        })
    })
    .flatten();
    Ok(match y {
        Some(y) => Some(candle_core::Tensor::from_vec(y, (m, n), x.device())?),
        None => None,
    })
}

/// The narrowest column band worth a thread of its own.
const MIN_BAND: usize = 64;

/// Columns `start..end` of band `i` of `bands` over n columns: starts on multiples of 16 (whole
/// 64-byte lines of a row), the last band to n.
fn band(n: usize, bands: usize, i: usize) -> (usize, usize) {
    let edge = |i: usize| {
        if i == bands {
            n
        } else {
            (n * i / bands) / 16 * 16
        }
    };
    (edge(i), edge(i + 1))
}

/// Row counts up to this take `matmul_xwt` (a decode step's rows at a large batch). Past it
/// the crate streams the unpacked weight once per 64 rows, and `matmul_new`, whose packing is
/// then spread over enough rows, wins: a prefill's 400 rows ran at 0.78x (hidden states,
/// SmolLM2-135M, 2-core Xeon), while 128 decode rows took 7% less time a generation.
pub(crate) const XWT_MAX_ROWS: usize = 128;

/// `x [m, k] · wᵀ` for `w [n, k]` (both row-major): `[m, n]`, the same values to the bit as
/// `matmul_new` on `x` and `wᵀ`.
///
/// Given `x · wᵀ` with a row-major output, the gemm crate makes w its left operand and packs it
/// with a transposing gather on every call: at a decode step's 128 rows that packing was a quarter
/// of the step. Here x is the left operand instead, handed over transposed once (so the crate
/// reads it without packing), and wᵀ the right one, read in place. The crate then writes the
/// output column-major; each thread computes its band of columns in sub-bands of at most
/// `SUB_BAND` into an L2-sized scratch and transposes that into place. The microkernel sums
/// every value over k in the same order either way, hence the same bits. Inference calls
/// `xwt_rows`; this f32 entry is the tests' and timings'.
#[cfg(test)]
pub(crate) fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(w.len() >= n * k, "matmul_xwt: the weight is too short");
    matmul_xwt_rows(x, m, k, &F32Rows(w), n)
}

/// A decode step's many rows (past the small-rows kernel's, up to `XWT_MAX_ROWS`) against the
/// weight rows `rows` serves: on AVX-512 the broadcast kernel (`bcast`, each sum one FMA chain
/// in k order; at 64 rows it streamed the 30 layers 1.1-1.3x as fast as the crate's path on
/// the 2-core Xeon), elsewhere `matmul_xwt_rows`. Every weight storage takes the same path at
/// a row count, so a dequantized weight still gives the f32 load's values to the bit.
pub(crate) fn xwt_rows<R: WeightRows>(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &R,
    n: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if matches!(
        crate::kernels::simd::level(),
        crate::kernels::simd::Level::Avx512 | crate::kernels::simd::Level::Avx512Bf16
    ) {
        return crate::kernels::bcast::xwt(x, m, k, rows, n);
    }
    matmul_xwt_rows(x, m, k, rows, n)
}

/// `matmul_xwt` on the weight rows `rows` serves: read in place (f32), or widened a sub-band at
/// a time into a per-thread buffer (bf16, f16, quantized). Both run the same gemm calls on the
/// same sub-bands, so a dequantized weight gives the f32 load's values to the bit.
pub(crate) fn matmul_xwt_rows<R: WeightRows>(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &R,
    n: usize,
) -> Vec<f32> {
    assert!(x.len() >= m * k, "matmul_xwt: the input is too short");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    // x transposed, [k, m]: column i is row i of x.
    let mut xt = vec![0f32; k * m];
    for (i, row) in x.chunks_exact(k).take(m).enumerate() {
        for (p, v) in row.iter().enumerate() {
            xt[p * m + i] = *v;
        }
    }
    let threads = rayon::current_num_threads();
    let bands = if n < threads * MIN_BAND { 1 } else { threads };
    // About 1 MB of scratch per thread: the transpose reads it from L2; a widened sub-band
    // stays within about 2 MB.
    let sub = ((256 * 1024) / m).min((512 * 1024) / k).clamp(16, SUB_BAND) / 16 * 16;
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = crate::kernels::SharedMut(y.as_mut_ptr());
    (0..bands).into_par_iter().for_each(|band_i| {
        let (start, end) = band(n, bands, band_i);
        let mut yt = vec![0f32; sub.min(end - start) * m];
        let mut widened = vec![
            0f32;
            if R::WIDENS {
                sub.min(end - start) * k
            } else {
                0
            }
        ];
        for j0 in (start..end).step_by(sub) {
            let nb = sub.min(end - j0);
            let wb = if R::WIDENS {
                for (r, buf) in widened.chunks_exact_mut(k).take(nb).enumerate() {
                    rows.widen(j0 + r, buf);
                }
                &widened[..nb * k]
            } else {
                rows.direct_rows(j0, nb, k)
            };
            // Yᵀ for columns j0..j0 + nb, [nb, m] row-major (the crate's column-major output
            // of x · wᵀ): w's rows times xᵀ read from xt, which the crate turns into x as its
            // left operand, unpacked, and wᵀ as its right.
            let wb = Mat::new(wb, nb, k);
            matmul(&mut yt[..nb * m], m, wb, Mat::new(&xt, k, m), false, false);
            // yt[j * m + i] is y[i][j0 + j]: 16 x 16 blocks, each read as 16 runs of yt into
            // an L1 block and written as 16 runs of y.
            for i0 in (0..m).step_by(16) {
                let mi = 16.min(m - i0);
                for jb in (0..nb).step_by(16) {
                    let nj = 16.min(nb - jb);
                    let mut blk = [[0f32; 16]; 16];
                    for (j, b) in blk.iter_mut().enumerate().take(nj) {
                        let at = (jb + j) * m + i0;
                        b[..mi].copy_from_slice(&yt[at..at + mi]);
                    }
                    for i in 0..mi {
                        // SAFETY: row i0 + i < m, columns j0 + jb + j < end <= n: inside y's
                        // m x n, and the bands' columns are disjoint.
                        let dst = unsafe { out.get().add((i0 + i) * n + j0 + jb) };
                        for (j, b) in blk.iter().enumerate().take(nj) {
                            unsafe { *dst.add(j) = b[i] };
                        }
                    }
                }
            }
        }
    });
    // SAFETY: the bands cover columns 0..n and each writes its columns of every row.
    unsafe { y.set_len(m * n) };
    y
}

/// The widest sub-band `matmul_xwt` computes at once.
const SUB_BAND: usize = 512;

/// One gemm call: `dst [m, n] (+)= a · b` for the shapes as read, dst rows `dst_stride` apart.
///
/// # Safety
/// `dst` must be valid for writes of m rows of n at that stride; a and b must `fit`.
unsafe fn call(
    dst: *mut f32,
    dst_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    let ((m, k), (_, n)) = (a.shape(), b.shape());
    let ((a_cs, a_rs), (b_cs, b_rs)) = (a.strides(), b.strides());
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        a.data.as_ptr(),
        a_cs,
        a_rs,
        b.data.as_ptr(),
        b_cs,
        b_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
#[path = "gemm_tests.rs"]
mod tests;
