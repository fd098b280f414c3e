//! What the two bf16 product kernels (`amx`, `dpbf16`) share: their right-hand operand and the
//! reads that round f32 operands to bf16 (nearest even) while packing them. Each kernel packs
//! into its own layout; both read the operands through these.

use crate::kernels::gemm::Mat;
use half::bf16;

/// The right-hand operand: f32 through a `Mat` view, or a bf16 weight's rows `[n, k]` read
/// transposed (the inference prefill's `x · Wᵀ`).
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    F32(Mat<'a>),
    Bf16Rows {
        data: &'a [bf16],
        n: usize,
        k: usize,
    },
}

impl Src<'_> {
    /// The shape as read: `[k, n]`.
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Src::F32(m) => m.shape(),
            Src::Bf16Rows { n, k, .. } => (k, n),
        }
    }

    /// Whether each column of the matrix as read is contiguous in memory (a weight's row read
    /// transposed); otherwise its rows are.
    pub fn columns_contiguous(&self) -> bool {
        match *self {
            Src::F32(m) => m.transposed,
            Src::Bf16Rows { .. } => true,
        }
    }

    /// Column `j`'s `k` values as bf16 bits into `out[..k]`. Only when `columns_contiguous`.
    pub fn column_bits(&self, j: usize, out: &mut [u16]) {
        match *self {
            Src::F32(m) => round_into(f32_row(&m, j), &mut out[..m.cols]),
            Src::Bf16Rows { data, k, .. } => {
                for (d, s) in out[..k].iter_mut().zip(&data[j * k..(j + 1) * k]) {
                    *d = s.to_bits();
                }
            }
        }
    }

    /// Row `p`'s columns `j0..j0 + out.len()` as bf16 bits. Only when not `columns_contiguous`.
    pub fn row_bits(&self, p: usize, j0: usize, out: &mut [u16]) {
        match *self {
            Src::F32(m) => round_into(&f32_row(&m, p)[j0..j0 + out.len()], out),
            Src::Bf16Rows { .. } => unreachable!("a bf16 weight's columns are contiguous"),
        }
    }
}

pub(crate) fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// `src` rounded to bf16 (nearest even) into `dst` (same length), as bits.
#[inline(always)]
pub(crate) fn round_into(src: &[f32], dst: &mut [u16]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    dst.reinterpret_cast_mut::<bf16>()
        .convert_from_f32_slice(src);
}

/// Row `i` of the matrix as stored (as read when not transposed), contiguous in memory.
pub(crate) fn f32_row<'a>(m: &Mat<'a>, i: usize) -> &'a [f32] {
    &m.data[i * m.cols..(i + 1) * m.cols]
}
