//! What the fused blocks (`mlp`, `attention::block`: a layer's half, from its input norm to its
//! residual add, as one op) share: projections and the input norm run on slices with the same
//! kernels as the separate ops (`linear`, `norm`), so a block's intermediates never become
//! candle tensors with gradients of their own, and the residual path.

use super::rows::{with_packed, with_rows, Rows};
use super::{cpu_f32, norm};
use crate::kernels::gemm::{matmul_in_new, Mat, Precision};
use crate::model::layers::{Linear, LinearGrad};
use crate::model::RmsNorm;
use crate::train::sink::GradSink;
use candle_core::{DType, Layout, Tensor};
use std::sync::Arc;

/// One projection: its f32 weight `[out, in]`, its products' precision and, when the weight
/// trains, its gradient sink.
pub(super) struct Proj {
    weight: Tensor,
    sink: Option<Arc<GradSink>>,
    precision: Precision,
}

impl Proj {
    /// The projection when a fused block can run it: a dense f32 CPU weight without bias or
    /// scaling, in a training pass (frozen, or with a sink). `None` otherwise: the caller
    /// composes the block from separate ops then.
    pub fn of(l: &Linear) -> Option<Proj> {
        let w = l.weight.as_dense()?;
        if w.dtype() != DType::F32 || !w.device().is_cpu() || l.bias.is_some() || l.scale != 1.0 {
            return None;
        }
        let sink = match &l.grad {
            LinearGrad::Frozen => None,
            LinearGrad::Sink(s) => Some(s.clone()),
            LinearGrad::Infer | LinearGrad::Autograd => return None,
        };
        Some(Proj {
            weight: w.contiguous().ok()?,
            sink,
            precision: l.precision,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.weight.dims2()
    }

    /// `x · Wᵀ` for `rows` packed rows of `x`.
    pub fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let (out, inner) = self.dims()?;
        let (w_s, w_l) = self.weight.storage_and_layout();
        let w = cpu_f32(&w_s, w_l)?;
        let (xm, wm) = (Mat::new(x, rows, inner), Mat::new(w, out, inner));
        Ok(matmul_in_new(self.precision, xm, wm.t(), true))
    }

    /// `dx = dy · W` and, when the weight trains, the sink `+= dyᵀ · x`: side by side, one
    /// product per thread, as the linear op runs them.
    pub fn backward(&self, dy: &[f32], x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let (out, inner) = self.dims()?;
        let (w_s, w_l) = self.weight.storage_and_layout();
        let w = cpu_f32(&w_s, w_l)?;
        let (dym, wm) = (Mat::new(dy, rows, out), Mat::new(w, out, inner));
        Ok(match &self.sink {
            None => matmul_in_new(self.precision, dym, wm, true),
            Some(sink) => {
                let (dx, dw) = rayon::join(
                    || matmul_in_new(self.precision, dym, wm, false),
                    || sink.add_at_b(dy, x, rows, false, self.precision),
                );
                dw.map_err(|e| candle_core::Error::Msg(format!("projection backward: {e:#}")))?;
                dx
            }
        })
    }
}

/// The row view of a packed `[count, width]` buffer.
pub(super) fn packed_rows(count: usize, width: usize) -> Rows {
    Rows::new(&Layout::contiguous((count, width))).expect("a packed layout has packed rows")
}

/// `y += x`, threaded (a block's residual path, forward and backward).
pub(super) fn add_into(y: &mut [f32], x: &[f32]) {
    use rayon::prelude::*;
    y.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &a)| *o += a);
}

/// A block's input norm.
pub(super) struct PreNorm {
    pub eps: f32,
    pub plus_one: bool,
}

impl PreNorm {
    pub fn of(n: &RmsNorm) -> PreNorm {
        PreNorm {
            eps: n.eps as f32,
            plus_one: n.plus_one,
        }
    }

    /// The normed rows of `x: [n, hid]` (packed) with weight `w`, and each row's 1/rms.
    pub fn forward(&self, x: &[f32], w: &[f32], n: usize, hid: usize) -> (Vec<f32>, Vec<f32>) {
        let s = norm::scale(w, self.plus_one);
        norm::forward(x, &packed_rows(n, hid), &s, self.eps)
    }

    /// The block's gradients for candle: the input's, `d(norm input) + dy` (the residual path
    /// carries `dy` to `x` unchanged), and the norm weight's when it trains. `dh`: the normed
    /// rows' gradient; `inv`: the forward's 1/rms.
    pub fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dh: &[f32],
        dy: &[f32],
        inv: &[f32],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_w) = (x.track_op(), w.track_op());
        if !need_x && !need_w {
            return Ok((None, None));
        }
        let (n, hid) = x.dims2()?;
        with_rows(x, "block", |xd, xr| {
            with_packed(w, "block", |wd| {
                let s = norm::scale(wd, self.plus_one);
                let dh_rows = packed_rows(n, hid);
                let (dx, dw) = norm::backward(
                    xd,
                    xr,
                    dh,
                    &dh_rows,
                    &s,
                    Some(inv),
                    self.eps,
                    need_x,
                    need_w,
                );
                let dx = match dx {
                    Some(mut v) => {
                        add_into(&mut v, dy);
                        Some(Tensor::from_vec(v, (n, hid), x.device())?)
                    }
                    None => None,
                };
                let dw = match dw {
                    Some(v) => Some(Tensor::from_vec(v, hid, w.device())?),
                    None => None,
                };
                Ok((dx, dw))
            })
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use anyhow::Result;
    use candle_core::Device;

    pub fn randn(shape: (usize, usize), seed: u64) -> Result<Tensor> {
        let v = crate::kernels::pseudo(shape.0 * shape.1, seed);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// A projection in a training pass: with a gradient sink when it trains, else frozen.
    pub fn linear(w: &Tensor, trains: bool) -> Linear {
        let mut l = Linear::new(crate::model::weight::Weight::dense(w.clone()), None);
        let (rows, cols) = w.dims2().unwrap();
        l.grad = if trains {
            LinearGrad::Sink(Arc::new(GradSink::new(rows, cols)))
        } else {
            LinearGrad::Frozen
        };
        l
    }

    /// What the projection's sink holds.
    pub fn sink(l: &Linear) -> Option<Tensor> {
        match &l.grad {
            LinearGrad::Sink(s) => s.to_tensor().unwrap(),
            _ => None,
        }
    }
}
