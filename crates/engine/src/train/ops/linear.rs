//! `x · Wᵀ` with a backward pass that writes each gradient once, straight from gemm: the input's
//! `dy · W`, and the weight's `dyᵀ · x` only when the weight trains. candle's matmul backward
//! would hand back the weight's gradient as a transposed view (copied later) and compute it even
//! for a frozen weight.

use super::{f32_slice, tensor_from};
use crate::kernels::gemm::{matmul, Mat};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

struct LinearOp {
    weight_grad: bool,
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
        let mut y = vec![0f32; rows * out];
        matmul(
            &mut y,
            out,
            Mat::new(x, rows, inner),
            Mat::new(w, out, inner).t(),
            false,
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
        let mut dx = vec![0f32; rows * inner];
        let dym = Mat::new(dy_v, rows, out);
        matmul(&mut dx, inner, dym, Mat::new(w_v, out, inner), false, true);
        let dw = if self.weight_grad {
            let (x_s, x_l) = x.storage_and_layout();
            let x_v = super::cpu_f32(&x_s, x_l)?;
            let mut dw = vec![0f32; out * inner];
            matmul(
                &mut dw,
                inner,
                dym.t(),
                Mat::new(x_v, rows, inner),
                false,
                true,
            );
            Some(tensor_from(dw, (out, inner), w)?)
        } else {
            None
        };
        Ok((Some(tensor_from(dx, (rows, inner), x)?), dw))
    }
}

/// `x: [rows, in]` times the transpose of `weight: [out, in]` (f32, CPU). With `weight_grad`
/// false the backward pass computes only the input's gradient (a frozen weight).
pub fn linear(x: &Tensor, weight: &Tensor, weight_grad: bool) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, LinearOp { weight_grad })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_equal_matmul_and_a_frozen_weight_gets_none() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, inner, out) in [(3, 7, 5), (37, 64, 96)] {
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, inner), &dev)?)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, inner), &dev)?)?;
            let coef = Tensor::randn(0f32, 1.0, (rows, out), &dev)?;
            let want = x.as_tensor().matmul(&w.as_tensor().t()?)?;
            for weight_grad in [true, false] {
                let got = linear(x.as_tensor(), w.as_tensor(), weight_grad)?;
                let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "forward differs by {diff}");
                let g_ref = (&want * &coef)?.sum_all()?.backward()?;
                let g = (got * &coef)?.sum_all()?.backward()?;
                let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
                };
                let gx = g.get(x.as_tensor()).unwrap();
                assert!(close(gx, g_ref.get(x.as_tensor()).unwrap())? < 1e-4);
                match g.get(w.as_tensor()) {
                    Some(gw) if weight_grad => {
                        assert!(gw.is_contiguous());
                        assert!(close(gw, g_ref.get(w.as_tensor()).unwrap())? < 1e-4);
                    }
                    None if !weight_grad => {}
                    other => panic!(
                        "weight gradient {:?} with weight_grad {weight_grad}",
                        other.is_some()
                    ),
                }
            }
        }
        Ok(())
    }
}
