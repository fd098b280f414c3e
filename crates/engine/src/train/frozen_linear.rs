//! `x · Wᵀ` for a frozen weight: candle's matmul backward computes the gradients of both
//! operands, so a frozen linear would still pay for a weight gradient it throws away (a third of
//! a layer's backward matmul work). This op returns only the input's gradient.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `[out, in]`, a plain (non-variable) tensor.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inner) = x_l.shape().dims2()?;
        let (out, w_inner) = self.weight.dims2()?;
        if inner != w_inner {
            candle_core::bail!(
                "frozen-matmul: input has {inner} features, weight expects {w_inner}"
            );
        }
        let wt = self.weight.t()?;
        let (w_storage, wt_l) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul: weight is not on the CPU")
        };
        let y = x.matmul(w, (1, rows, out, inner), x_l, wt_l)?;
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.weight)?))
    }
}

/// `x: [rows, in]` times the transpose of the frozen `weight: [out, in]`.
pub fn matmul_frozen(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_values_and_input_gradient_as_matmul_and_no_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev)?)?;
        let coef = Tensor::randn(0f32, 1.0, (3, 5), &dev)?;
        let y_ref = x.as_tensor().matmul(&w.t()?)?;
        let y = matmul_frozen(x.as_tensor(), &w)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "forward differs from matmul");
        let g_ref = (y_ref * &coef)?.sum_all()?.backward()?;
        let g = (y * &coef)?.sum_all()?.backward()?;
        let gx_ref = g_ref.get(x.as_tensor()).unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        assert!((gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        assert!(g.get(&w).is_none(), "a frozen weight must get no gradient");
        Ok(())
    }
}
