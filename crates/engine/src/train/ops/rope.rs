//! Rotary position embeddings as one op with a backward pass: the composed version (two cats of
//! cos/sin, narrows, neg, cat, two broadcast muls, add, and a cat for partial rotary) allocates
//! six full-size intermediates; the backward of a rotation is the inverse rotation of the
//! gradient, so neither pass keeps anything.

use super::rows::{input_rows, rows_per_task, rows_readable, with_packed, with_rows, Rows};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

struct RopeOp {
    /// `[B or 1, T, rot_dim/2]`, contiguous constants (no gradient).
    cos: Tensor,
    sin: Tensor,
    rot_dim: usize,
}

/// `y = rotate(x)` by `+angle` (`sign` 1) or `-angle` (`sign` -1, the backward), rotate-half
/// convention on the first `2 * c.len()` dims; the rest are copied.
pub(crate) fn rotate_row(x: &[f32], c: &[f32], s: &[f32], sign: f32, y: &mut [f32]) {
    let half = c.len();
    let (x1, rest) = x.split_at(half);
    let (x2, pass) = rest.split_at(half);
    let (y1, rest) = y.split_at_mut(half);
    let (y2, ypass) = rest.split_at_mut(half);
    for i in 0..half {
        let sv = s[i] * sign;
        y1[i] = x1[i] * c[i] - x2[i] * sv;
        y2[i] = x2[i] * c[i] + x1[i] * sv;
    }
    ypass.copy_from_slice(pass);
}

/// Rotates rows of `x` (`[B, H, T, D]`, rows read through `xr`) on their first `rot_dim` dims
/// in the rotate-half convention, by `+angle` (`sign` 1) or `-angle` (`sign` -1, the backward).
/// Returns a contiguous `[B, H, T, D]` buffer.
#[allow(clippy::too_many_arguments)]
fn rotate(
    x: &[f32],
    xr: &Rows,
    (h, t): (usize, usize),
    cos: &[f32],
    sin: &[f32],
    cos_batched: bool,
    rot_dim: usize,
    sign: f32,
) -> Vec<f32> {
    let (n, d) = (xr.count, xr.width);
    let half = rot_dim / 2;
    let mut y = vec![0f32; n * d];
    let per = rows_per_task(n, d);
    y.par_chunks_mut(per * d).enumerate().for_each(|(ci, yc)| {
        for (j, yrow) in yc.chunks_exact_mut(d).enumerate() {
            let row = ci * per + j;
            let xrow = xr.row(x, row);
            let b = if cos_batched { row / (h * t) } else { 0 };
            let at = (b * t + row % t) * half;
            rotate_row(xrow, &cos[at..at + half], &sin[at..at + half], sign, yrow);
        }
    });
    y
}

impl RopeOp {
    /// Checks `x: [B, H, T, D]` against the tables; returns (h, t, whether cos has a batch).
    fn geometry(&self, dims: &[usize]) -> candle_core::Result<(usize, usize, bool)> {
        let &[b, h, t, d] = dims else {
            candle_core::bail!("rope: x must be [B, H, T, D], got {dims:?}")
        };
        let (cb, ct, half) = self.cos.dims3()?;
        if !self.rot_dim.is_multiple_of(2) || self.rot_dim > d || half * 2 != self.rot_dim {
            candle_core::bail!(
                "rope: rot_dim {} with head dim {d} and tables of {half}",
                self.rot_dim
            );
        }
        if ct != t || (cb != b && cb != 1) || self.sin.dims() != self.cos.dims() {
            candle_core::bail!(
                "rope: cos {:?} / sin {:?} for x {dims:?}",
                self.cos.dims(),
                self.sin.dims()
            );
        }
        Ok((h, t, cb != 1))
    }

    fn apply(
        &self,
        x: &[f32],
        xr: &Rows,
        dims: &[usize],
        sign: f32,
    ) -> candle_core::Result<Vec<f32>> {
        let (h, t, batched) = self.geometry(dims)?;
        with_packed(&self.cos, "rope", |cos| {
            with_packed(&self.sin, "rope", |sin| {
                Ok(rotate(x, xr, (h, t), cos, sin, batched, self.rot_dim, sign))
            })
        })
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, xr) = input_rows(xs, xl, "rope")?;
        let y = self.apply(x, &xr, xl.dims(), 1.0)?;
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_rows(g, "rope", |gd, gr| self.apply(gd, gr, g.dims(), -1.0))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Rotates `x: [B, H, T, D]` (any layout whose last dimension is packed reads in place, e.g.
/// the transpose of `[B, T, H, D]`) on its first `rot_dim` dims, rotate-half convention, with
/// `cos`/`sin: [B, T, rot_dim/2]` as `Rope::cos_sin` builds them; the remaining dims pass
/// through. Returns a contiguous tensor; the gradient flows to `x` only.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot_dim: usize) -> Result<Tensor> {
    if cos.rank() != 3 {
        bail!("rope: cos must be [B, T, rot_dim/2], got {:?}", cos.dims());
    }
    let op = RopeOp {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        rot_dim,
    };
    Ok(rows_readable(x)?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use crate::train::ops::rows::{rel_err, value_and_grad_errs};
    use candle_core::{Device, Var};

    /// The decoder's differentiable path (model/rope.rs `apply(.., true)`).
    fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor, rot_dim: usize) -> Result<Tensor> {
        let d = x.dim(3)?;
        let rot = x.narrow(3, 0, rot_dim)?;
        let c = Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?;
        let s = Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?;
        let half = rot_dim / 2;
        let x1 = rot.narrow(3, 0, half)?;
        let x2 = rot.narrow(3, half, half)?;
        let rotate_half = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        let rotated = (rot.broadcast_mul(&c)? + rotate_half.broadcast_mul(&s)?)?;
        Ok(if rot_dim == d {
            rotated
        } else {
            Tensor::cat(&[&rotated, &x.narrow(3, rot_dim, d - rot_dim)?], 3)?
        })
    }

    /// `x` is built as `[B, T, H, D]` and transposed (the decoder's layout) when `transposed`.
    fn check(
        (b, h, t, d): (usize, usize, usize, usize),
        rot: usize,
        transposed: bool,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let n = b * h * t * d;
        let xv = Var::from_tensor(&Tensor::from_vec(pseudo(n, 11), n, &dev)?)?;
        let x = if transposed {
            xv.as_tensor().reshape((b, t, h, d))?.transpose(1, 2)?
        } else {
            xv.as_tensor().reshape((b, h, t, d))?
        };
        // Real angles for distinct positions per batch row, as Rope::cos_sin makes them.
        let half = rot / 2;
        let angles: Vec<f32> = (0..b * t * half)
            .map(|i| {
                ((i / half) % t + 3 * (i / (t * half))) as f32 * 0.7f32.powi((i % half) as i32)
            })
            .collect();
        let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect(), (b, t, half), &dev)?;
        let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect(), (b, t, half), &dev)?;
        let coef = Tensor::from_vec(pseudo(n, 12), (b, h, t, d), &dev)?;
        let y_ref = reference(&x, &cos, &sin, rot)?;
        let y = rope(&x, &cos, &sin, rot)?;
        assert!(y.is_contiguous() && y.dims() == [b, h, t, d]);
        let what = format!("{:?} rot {rot} transposed {transposed}", (b, h, t, d));
        let (e, de, g) = value_and_grad_errs(&y, &y_ref, &coef, &[xv.as_tensor()])?;
        assert!(e < 1e-6, "{what}: values off by {e}");
        assert!(de[0] < 1e-6, "{what}: dx off by {}", de[0]);
        assert!(g.get(&cos).is_none() && g.get(&sin).is_none());
        Ok(())
    }

    #[test]
    fn matches_the_composed_rotation_in_values_and_gradients() -> Result<()> {
        for transposed in [false, true] {
            check((1, 1, 1, 2), 2, transposed)?;
            check((2, 3, 5, 8), 8, transposed)?;
            check((2, 3, 5, 10), 6, transposed)?; // partial rotary, odd pass-through
            check((2, 9, 70, 64), 64, transposed)?; // several rayon tasks
            check((3, 4, 17, 96), 32, transposed)?; // phi-style partial_rotary_factor
        }
        Ok(())
    }

    #[test]
    fn one_table_row_serves_every_batch_row() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, d) = (3, 2, 5, 8);
        let x = Tensor::from_vec(pseudo(b * h * t * d, 13), (b, h, t, d), &dev)?;
        let angles: Vec<f32> = (0..t * 4).map(|i| i as f32 * 0.3).collect();
        let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect(), (1, t, 4), &dev)?;
        let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect(), (1, t, 4), &dev)?;
        let e = rel_err(&rope(&x, &cos, &sin, 8)?, &reference(&x, &cos, &sin, 8)?)?;
        assert!(e < 1e-6, "values off by {e}");
        Ok(())
    }

    #[test]
    fn rejects_mismatched_tables() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 8), candle_core::DType::F32, &dev)?;
        let c = Tensor::zeros((1, 3, 3), candle_core::DType::F32, &dev)?;
        assert!(rope(&x, &c, &c, 8).is_err(), "rot_dim 8 needs tables of 4");
        let c = Tensor::zeros((1, 4, 4), candle_core::DType::F32, &dev)?;
        assert!(rope(&x, &c, &c, 8).is_err(), "4 positions for 3");
        Ok(())
    }
}
