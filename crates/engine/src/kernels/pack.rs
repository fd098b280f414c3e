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

    /// Row `p` as stored, f32. Only when not `columns_contiguous`.
    pub fn row(&self, p: usize) -> &[f32] {
        match self {
            Src::F32(m) => f32_row(m, p),
            Src::Bf16Rows { .. } => unreachable!("a bf16 weight's columns are contiguous"),
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

/// `x` rounded to bf16 (nearest even; a NaN stays a quiet NaN), as bits: `half`'s rounding
/// without branches, so that a loop of it vectorises.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
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

/// A kernel under `check_bf16_product`: `(dst, dst_stride, a, b, accumulate, call)`.
#[cfg(test)]
pub(crate) type Bf16Product = dyn Fn(&mut [f32], usize, Mat, Src, bool, usize);

/// The bf16 product kernels' shared test: `mul(dst, dst_stride, a, b, accumulate, call)` on every
/// operand form the callers use (A as is and transposed; B as f32 as is, f32 transposed, a bf16
/// weight's rows read transposed), for each `(m, k, n)`, written into a column band of a wider
/// destination and then accumulated; against f64 math on the bf16-rounded operands. `call`
/// counts the calls, for a kernel to vary its own options by.
#[cfg(test)]
pub(crate) fn check_bf16_product(shapes: &[(usize, usize, usize)], mul: &Bf16Product) {
    let r = |x: f32| bf16::from_f32(x).to_f64();
    let mut call = 0;
    for &(m, k, n) in shapes {
        let a = crate::kernels::pseudo(m * k, 1);
        let b = crate::kernels::pseudo(k * n, 2);
        // a as [m, k]; b stored as [n, k] (read transposed) or as [k, n].
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let btb: Vec<bf16> = bt.iter().map(|&x| bf16::from_f32(x)).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let a_forms = [Mat::new(&a, m, k), Mat::new(&at, k, m).t()];
        let b_forms = [
            Src::F32(Mat::new(&b, k, n)),
            Src::F32(Mat::new(&bt, n, k).t()),
            Src::Bf16Rows { data: &btb, n, k },
        ];
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                (0..k)
                    .map(|p| r(a[(e / n) * k + p]) * r(b[p * n + e % n]))
                    .sum()
            })
            .collect();
        for (ai, af) in a_forms.iter().enumerate() {
            for (bi, bf) in b_forms.iter().enumerate() {
                let stride = n + 3;
                let mut dst = vec![9f32; (m - 1) * stride + n + 2];
                mul(&mut dst[2..], stride, *af, *bf, false, call);
                mul(&mut dst[2..], stride, *af, *bf, true, call + 1);
                call += 2;
                assert_eq!(dst[0], 9.0);
                for i in 0..m {
                    for j in 0..n {
                        let got = dst[2 + i * stride + j] as f64;
                        let e = 2.0 * want[i * n + j];
                        assert!(
                            (got - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt(),
                            "{m}x{k}x{n} a{ai} b{bi} ({i},{j}): {got} vs {e}"
                        );
                    }
                    if i + 1 < m {
                        assert_eq!(dst[2 + i * stride + n], 9.0, "column band");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free rounding is `half`'s, bit for bit: ties both ways, both signs, the
    /// largest finite values (rounding to infinity), subnormals, infinities and NaNs.
    #[test]
    fn bf16_bits_equals_half() {
        let mut values: Vec<f32> = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
        ]
        .to_vec();
        values.extend(
            [
                0x3f80_8000u32,
                0x3f81_8000,
                0x3f80_8001,
                0x3f80_7fff,
                0x7f80_0001,
                0xff80_0001,
            ]
            .map(f32::from_bits),
        );
        values.extend(crate::kernels::pseudo(100_000, 7).iter().map(|x| x * 1e3));
        let mut s = 1u32;
        for _ in 0..1_000_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            values.push(f32::from_bits(s));
        }
        for x in values {
            assert_eq!(
                bf16_bits(x),
                bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }
}
