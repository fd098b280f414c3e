//! What the fused blocks (`mlp`, `attention::block`: a layer's half, from its input norm to its
//! residual add, as one op) share: projections and the input norm run on slices with the same
//! kernels as the separate ops (`linear`, `norm`), so a block's intermediates never become
//! candle tensors with gradients of their own, and the residual path.

use super::rows::{add_into, with_packed, Rows};
use super::{f32_slice, norm};
use crate::kernels::gemm::{matmul_in_new, Mat, Precision};
use crate::model::layers::{Linear, LinearGrad};
use crate::model::RmsNorm;
use crate::train::sink::GradSink;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

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
        with_packed(&self.weight, "projection", |w| {
            let (xm, wm) = (Mat::new(x, rows, inner), Mat::new(w, out, inner));
            Ok(matmul_in_new(self.precision, xm, wm.t(), true))
        })
    }

    /// `dx = dy · W` and, when the weight trains, the sink `+= dyᵀ · x`: side by side, one
    /// product per thread, as the linear op runs them.
    pub fn backward(&self, dy: &[f32], x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let (out, inner) = self.dims()?;
        with_packed(&self.weight, "projection", |w| {
            let (dym, wm) = (Mat::new(dy, rows, out), Mat::new(w, out, inner));
            Ok(match &self.sink {
                None => matmul_in_new(self.precision, dym, wm, true),
                Some(sink) => {
                    let (dx, dw) = rayon::join(
                        || matmul_in_new(self.precision, dym, wm, false),
                        || sink.add_at_b(dy, x, rows, false, self.precision),
                    );
                    let msg = |e: anyhow::Error| format!("projection backward: {e:#}");
                    dw.map_err(|e| candle_core::Error::Msg(msg(e)))?;
                    dx
                }
            })
        })
    }
}

/// The row view of a packed `[count, width]` buffer.
pub(super) fn packed_rows(count: usize, width: usize) -> Rows {
    Rows::new(&Layout::contiguous((count, width))).expect("a packed layout has packed rows")
}

/// A layer's half between its input norm and its residual add (the attention, or the MLP),
/// on packed rows.
pub(super) trait Half: Send + Sync {
    /// What the half's backward needs from its forward.
    type Saved: Send + Sync;
    const NAME: &'static str;
    /// Checks the half's weights against rows of `hid` values.
    fn check(&self, hid: usize) -> candle_core::Result<()>;
    /// The half's output `[n, hid]` from the `n` normed rows `h`, and what backward needs.
    fn forward(&self, h: &[f32], n: usize) -> candle_core::Result<(Vec<f32>, Self::Saved)>;
    /// The normed rows' gradient from the output's `dy`; the weights' go to their sinks.
    fn backward(
        &self,
        saved: &Self::Saved,
        h: &[f32],
        dy: &[f32],
        n: usize,
    ) -> candle_core::Result<Vec<f32>>;
}

/// `y = x + half(rmsnorm(x))` as one op on `(x, norm weight)`: candle tracks only those two,
/// and backward hands it the input's gradient (the residual's `dy` included) and the norm
/// weight's when it trains.
struct BlockOp<H: Half> {
    eps: f32,
    plus_one: bool,
    half: H,
    saved: Mutex<Option<Kept<H::Saved>>>,
}

/// What a block's forward keeps: the normed rows, their 1/rms, and the half's own.
struct Kept<S> {
    h: Vec<f32>,
    inv: Vec<f32>,
    half: S,
}

impl<H: Half> CustomOp2 for BlockOp<H> {
    fn name(&self) -> &'static str {
        H::NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, hid) = xl.shape().dims2()?;
        if wl.dims() != [hid] {
            candle_core::bail!("{}: norm weight {:?} for rows of {hid}", H::NAME, wl.dims());
        }
        self.half.check(hid)?;
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let s = norm::scale(w, self.plus_one);
        let (h, inv) = norm::forward(x, &packed_rows(n, hid), &s, self.eps);
        let (mut y, half) = self.half.forward(&h, n)?;
        add_into(&mut y, x);
        *self.saved.lock().unwrap() = Some(Kept { h, inv, half });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().unwrap();
        let Some(Kept { h, inv, half }) = guard.as_ref() else {
            candle_core::bail!("{}: backward before forward", H::NAME)
        };
        let (n, hid) = x.dims2()?;
        with_packed(dy, H::NAME, |dy| {
            let dh = self.half.backward(half, h, dy, n)?;
            let rows = packed_rows(n, hid);
            let (eps, plus_one) = (self.eps, self.plus_one);
            norm::grads(x, w, (&dh, &rows), Some(inv), eps, plus_one, Some(dy))
        })
    }
}

/// `x + half(norm(x))` for the packed rows `x: [N, H]`, as one op.
pub(super) fn block<H: Half + 'static>(x: &Tensor, norm: &RmsNorm, half: H) -> Result<Tensor> {
    let op = BlockOp {
        eps: norm.eps as f32,
        plus_one: norm.plus_one,
        half,
        saved: Mutex::new(None),
    };
    Ok(x.contiguous()?.apply_op2(&norm.weight.contiguous()?, op)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
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
