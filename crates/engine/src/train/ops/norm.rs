//! RMSNorm as one op with a backward pass: candle's composed version (sqr, mean, add, sqrt,
//! div, mul) keeps four full-size intermediates for backward and runs each pass single-threaded;
//! this keeps only the per-row 1/rms.

use super::rows::{
    add_into, f32_data, input_rows, rows_per_task, rows_readable, with_packed, with_rows, Rows,
};
use crate::kernels::attention::dot;
use crate::kernels::mem::for_overwrite;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

struct RmsNormOp {
    eps: f32,
    plus_one: bool,
    /// 1/rms per row, saved by the forward for the backward.
    inv_rms: Mutex<Option<Vec<f32>>>,
}

/// What the normalised row is multiplied by (Gemma's weights are stored as `w` for `1 + w`).
pub(super) fn scale(w: &[f32], plus_one: bool) -> Vec<f32> {
    if plus_one {
        w.iter().map(|v| v + 1.0).collect()
    } else {
        w.to_vec()
    }
}

/// 1/sqrt(mean(x²) + eps), the mean taken in f32 as candle's `mean_keepdim` does (sum, then
/// times 1/H rounded to f32).
#[inline]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = dot(row, row) * (1.0 / row.len() as f64) as f32;
    1.0 / (ms + eps).sqrt()
}

/// The normalised rows `x·r·s` (`[count, width]`, packed) and each row's `r` = 1/rms.
pub(super) fn forward(x: &[f32], xr: &Rows, s: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (n, h) = (xr.count, xr.width);
    // SAFETY: the loop below sets every row of `y` and every `inv` before anything reads them.
    let (mut y, mut inv) = unsafe { (for_overwrite(n * h), for_overwrite(n)) };
    let per = rows_per_task(n, h);
    y.par_chunks_mut(per * h)
        .zip(inv.par_chunks_mut(per))
        .enumerate()
        .for_each(|(ci, (yc, ic))| {
            for (j, (yr, ir)) in yc.chunks_exact_mut(h).zip(ic.iter_mut()).enumerate() {
                let xrow = xr.row(x, ci * per + j);
                let r = inv_rms(xrow, eps);
                *ir = r;
                for ((o, &a), &b) in yr.iter_mut().zip(xrow).zip(s) {
                    *o = a * r * b;
                }
            }
        });
    (y, inv)
}

fn check_weight(h: usize, w: &Tensor) -> candle_core::Result<()> {
    if w.dims() != [h] {
        candle_core::bail!("rms-norm: weight {:?} for rows of {h}", w.dims());
    }
    Ok(())
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, xr) = input_rows(xs, xl, "rms-norm")?;
        let w = f32_data(ws, "rms-norm")?;
        let h = xr.width;
        if wl.dims() != [h] || !wl.is_contiguous() {
            candle_core::bail!("rms-norm: weight {:?} for rows of {h}", wl.dims());
        }
        let s = scale(&w[wl.start_offset()..wl.start_offset() + h], self.plus_one);
        let (y, inv) = forward(x, &xr, &s, self.eps);
        *self.inv_rms.lock().unwrap() = Some(inv);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.inv_rms.lock().unwrap();
        with_rows(g, "rms-norm", |gd, gr| {
            grads(
                x,
                w,
                (gd, gr),
                saved.as_deref(),
                self.eps,
                self.plus_one,
                None,
            )
        })
    }
}

/// The gradients for candle of `x` and the weight `w` (each when it is tracked), from the
/// output's gradient rows `g`; with `residual`, the output was `x + f(norm(x))` and its
/// gradient (`residual`) is added to `x`'s. `inv`: the forward's 1/rms per row.
pub(super) fn grads(
    x: &Tensor,
    w: &Tensor,
    (gd, gr): (&[f32], &Rows),
    inv: Option<&[f32]>,
    eps: f32,
    plus_one: bool,
    residual: Option<&[f32]>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (need_x, need_w) = (x.track_op(), w.track_op());
    if !need_x && !need_w {
        return Ok((None, None));
    }
    with_rows(x, "rms-norm", |xd, xr| {
        let h = xr.width;
        check_weight(h, w)?;
        with_packed(w, "rms-norm", |wd| {
            let s = scale(wd, plus_one);
            let (dx, dw) = backward(xd, xr, gd, gr, &s, inv, eps, need_x, need_w);
            let dx = match dx {
                Some(mut v) => {
                    if let Some(r) = residual {
                        add_into(&mut v, r);
                    }
                    Some(Tensor::from_vec(v, x.shape(), x.device())?)
                }
                None => None,
            };
            let dw = match dw {
                Some(v) => Some(Tensor::from_vec(v, h, w.device())?),
                None => None,
            };
            Ok((dx, dw))
        })
    })
}

/// dx = r·(g∘s) − x·r³·mean((g∘s)∘x) and dw = Σ_rows g∘x·r, one pass over each row for the
/// dot product and the weight gradient, one for dx. `inv` is the forward's saved 1/rms
/// (recomputed if absent).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    x: &[f32],
    xr: &Rows,
    g: &[f32],
    gr: &Rows,
    s: &[f32],
    inv: Option<&[f32]>,
    eps: f32,
    need_x: bool,
    need_w: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (n, h) = (xr.count, xr.width);
    let inv_h = 1.0 / h as f32;
    let per = rows_per_task(n, h);
    // One task's rows; returns its partial weight gradient (empty when not needed).
    let task = |ci: usize, mut dxc: Option<&mut [f32]>| -> Vec<f32> {
        let mut dw = if need_w { vec![0f32; h] } else { Vec::new() };
        let end = ((ci + 1) * per).min(n);
        for (j, row) in (ci * per..end).enumerate() {
            let xrow = xr.row(x, row);
            let grow = gr.row(g, row);
            let r = inv.map_or_else(|| inv_rms(xrow, eps), |v| v[row]);
            if need_w {
                for ((d, &a), &b) in dw.iter_mut().zip(xrow).zip(grow) {
                    *d += a * b * r;
                }
            }
            if let Some(dxc) = dxc.as_deref_mut() {
                let mut acc = [0f32; 8];
                let chunks = xrow.chunks_exact(8).zip(grow.chunks_exact(8));
                for ((xa, ga), sa) in chunks.zip(s.chunks_exact(8)) {
                    for i in 0..8 {
                        acc[i] += ga[i] * sa[i] * xa[i];
                    }
                }
                let tail = h - h % 8;
                let mut sum: f32 = acc.iter().sum();
                for i in tail..h {
                    sum += grow[i] * s[i] * xrow[i];
                }
                let coef = sum * r * r * r * inv_h;
                let out = &mut dxc[j * h..(j + 1) * h];
                for (((o, &a), &b), &c) in out.iter_mut().zip(xrow).zip(grow).zip(s) {
                    *o = r * b * c - coef * a;
                }
            }
        }
        dw
    };
    let sum_partials = |mut a: Vec<f32>, b: Vec<f32>| {
        if a.is_empty() {
            return b;
        }
        for (x, y) in a.iter_mut().zip(&b) {
            *x += y;
        }
        a
    };
    if need_x {
        // SAFETY: `task` sets every value of each row of its chunk (`out`) without reading it.
        let mut dx = unsafe { for_overwrite(n * h) };
        let dw = dx
            .par_chunks_mut(per * h)
            .enumerate()
            .map(|(ci, c)| task(ci, Some(c)))
            .reduce(Vec::new, sum_partials);
        (Some(dx), need_w.then_some(dw))
    } else {
        let dw = (0..n.div_ceil(per))
            .into_par_iter()
            .map(|ci| task(ci, None))
            .reduce(Vec::new, sum_partials);
        (None, Some(dw))
    }
}

/// RMSNorm over the last dimension of `x: [..., H]` (any layout) with `weight: [H]` (a `Var`
/// when trained): `x / sqrt(mean(x²) + eps) · w`, or `· (1 + w)` when `plus_one` (Gemma).
/// Gradients flow to both `x` and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, plus_one: bool) -> Result<Tensor> {
    let x = rows_readable(x)?;
    let weight = weight.contiguous()?;
    Ok(x.apply_op2(
        &weight,
        RmsNormOp {
            eps: eps as f32,
            plus_one,
            inv_rms: Mutex::new(None),
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use crate::train::ops::rows::{rel_err, value_and_grad_errs};
    use candle_core::{Device, Var, D};

    /// The decoder's differentiable RMSNorm (layers.rs `RmsNorm::forward(x, true)`).
    fn reference(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> Result<Tensor> {
        let s = if plus_one { (w + 1.0)? } else { w.clone() };
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&s)?)
    }

    /// Compares values and the gradients of x and w for `sum(y · coef)`; `x` is built with
    /// `dims` then transposed on `transpose` to test strided inputs.
    fn check(dims: &[usize], transpose: Option<(usize, usize)>, plus_one: bool) -> Result<()> {
        let dev = Device::Cpu;
        let n: usize = dims.iter().product();
        let base = Tensor::from_vec(pseudo(n, 1), dims, &dev)?;
        let xv = Var::from_tensor(&(base * 3.0)?)?;
        let x = match transpose {
            Some((a, b)) => xv.as_tensor().transpose(a, b)?,
            None => xv.as_tensor().clone(),
        };
        let h = *x.dims().last().unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(pseudo(h, 2), h, &dev)?)?;
        let coef = Tensor::from_vec(pseudo(n, 3), x.shape(), &dev)?;
        let eps = 1e-6;
        let y_ref = reference(&x, w.as_tensor(), eps, plus_one)?;
        let y = rms_norm(&x, w.as_tensor(), eps, plus_one)?;
        assert!(y.is_contiguous());
        let vars = [xv.as_tensor(), w.as_tensor()];
        let (e, de, _) = value_and_grad_errs(&y, &y_ref, &coef, &vars)?;
        assert!(
            e < 1e-6,
            "{dims:?} {transpose:?} plus_one={plus_one}: values off by {e}"
        );
        for (name, e) in ["x", "w"].iter().zip(de) {
            assert!(
                e < 1e-5,
                "{dims:?} {transpose:?} plus_one={plus_one}: d{name} off by {e}"
            );
        }
        Ok(())
    }

    #[test]
    fn matches_the_composed_norm_in_values_and_gradients() -> Result<()> {
        for plus_one in [false, true] {
            check(&[3, 7], None, plus_one)?;
            check(&[2, 5, 576], None, plus_one)?;
            check(&[64, 129], None, plus_one)?; // several rayon tasks, odd width
                                                // q/k norm on heads after the [B, T, NH, D] -> [B, NH, T, D] transpose.
            check(&[2, 33, 3, 64], Some((1, 2)), plus_one)?;
        }
        Ok(())
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_frozen_input_none_either() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(pseudo(40, 4), (5, 8), &dev)?)?;
        let w = Tensor::from_vec(pseudo(8, 5), 8, &dev)?;
        let g = rms_norm(x.as_tensor(), &w, 1e-5, false)?
            .sum_all()?
            .backward()?;
        assert!(g.get(x.as_tensor()).is_some() && g.get(&w).is_none());
        let x = Tensor::from_vec(pseudo(40, 4), (5, 8), &dev)?;
        let w = Var::from_tensor(&Tensor::from_vec(pseudo(8, 5), 8, &dev)?)?;
        let coef = Tensor::from_vec(pseudo(40, 6), (5, 8), &dev)?;
        let y_ref = reference(&x, w.as_tensor(), 1e-5, true)?;
        let y = rms_norm(&x, w.as_tensor(), 1e-5, true)?;
        let g_ref = (y_ref * &coef)?.sum_all()?.backward()?;
        let g = (y * &coef)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_none());
        let e = rel_err(
            g.get(w.as_tensor()).unwrap(),
            g_ref.get(w.as_tensor()).unwrap(),
        )?;
        assert!(e < 1e-5, "dw (input frozen) off by {e}");
        Ok(())
    }
}
