//! `x · Wᵀ` with a backward pass that writes each gradient once, straight from gemm: the input's
//! `dy · W`, and, when the weight trains, `dyᵀ · x` added in place into the weight's gradient
//! buffer ([`GradSink`]). The weight is a plain tensor, never a variable: candle's autograd
//! only carries activations.

use super::f32_slice;
use crate::kernels::gemm::{matmul_in_new, Mat, Precision};
use crate::train::sink::GradSink;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::sync::Arc;

struct LinearOp {
    sink: Option<Arc<GradSink>>,
    precision: Precision,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((rows, inner), (out, w_inner)) = (x_l.shape().dims2()?, w_l.shape().dims2()?);
        if inner != w_inner {
            candle_core::bail!("linear: input has {inner} features, the weight expects {w_inner}");
        }
        let (x, w) = (f32_slice(x, x_l)?, f32_slice(w, w_l)?);
        let y = matmul_in_new(
            self.precision,
            Mat::new(x, rows, inner),
            Mat::new(w, out, inner).t(),
            true,
        );
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ((rows, inner), (out, _)) = (x.dims2()?, w.dims2()?);
        let dy = dy.contiguous()?;
        let (dy_s, dy_l) = dy.storage_and_layout();
        let (w_s, w_l) = w.storage_and_layout();
        let dy_v = super::cpu_f32(&dy_s, dy_l)?;
        let w_v = super::cpu_f32(&w_s, w_l)?;
        let dym = Mat::new(dy_v, rows, out);
        let wm = Mat::new(w_v, out, inner);
        let dx = match &self.sink {
            None => matmul_in_new(self.precision, dym, wm, true),
            Some(sink) => {
                // The two products are independent: one per thread beats both split in two
                // (gemm's own splitting of a few hundred rows leaves threads waiting).
                let (x_s, x_l) = x.storage_and_layout();
                let x_v = super::cpu_f32(&x_s, x_l)?;
                let (dx, dw) = rayon::join(
                    || matmul_in_new(self.precision, dym, wm, false),
                    || sink.add_at_b(dy_v, x_v, rows, false, self.precision),
                );
                dw.map_err(|e| candle_core::Error::Msg(format!("linear backward: {e:#}")))?;
                dx
            }
        };
        Ok((Some(Tensor::from_vec(dx, (rows, inner), x.device())?), None))
    }
}

/// `x: [rows, in]` times the transpose of `weight: [out, in]` (f32, CPU), each product in
/// `precision`. The backward pass gives the input's gradient, and adds the weight's into `sink`
/// when there is one.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    sink: Option<&Arc<GradSink>>,
    precision: Precision,
) -> Result<Tensor> {
    let op = LinearOp {
        sink: sink.cloned(),
        precision,
    };
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn values_and_gradients_equal_matmul_and_the_sink_accumulates() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, inner, out) in [(3, 7, 5), (37, 64, 96)] {
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, inner), &dev)?)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, inner), &dev)?)?;
            let coef = Tensor::randn(0f32, 1.0, (rows, out), &dev)?;
            let want = x.as_tensor().matmul(&w.as_tensor().t()?)?;
            let g_ref = (&want * &coef)?.sum_all()?.backward()?;
            let (gx_ref, gw_ref) = (g_ref.get(&x).unwrap(), g_ref.get(&w).unwrap());
            let plain_w = w.as_tensor().detach();
            for with_sink in [true, false] {
                let sink = Arc::new(GradSink::new(out, inner));
                // Twice: the first write overwrites, the second adds.
                for pass in 1..=2 {
                    let got = linear(
                        x.as_tensor(),
                        &plain_w,
                        with_sink.then_some(&sink),
                        Precision::F32,
                    )?;
                    assert!(max_diff(&got, &want) < 1e-5, "forward");
                    let g = (got * &coef)?.sum_all()?.backward()?;
                    assert!(
                        max_diff(g.get(&x).unwrap(), gx_ref) < 1e-4,
                        "input gradient"
                    );
                    assert!(
                        g.get(&plain_w).is_none(),
                        "the weight is not in candle's store"
                    );
                    match sink.to_tensor()? {
                        Some(gw) => {
                            assert!(with_sink);
                            assert!(max_diff(&gw, &(gw_ref * pass as f64)?) < 1e-4);
                        }
                        None => assert!(!with_sink, "nothing written"),
                    }
                }
                sink.clear();
                assert!(sink.to_tensor()?.is_none());
            }
        }
        Ok(())
    }
}
