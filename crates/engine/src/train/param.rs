//! A trainable parameter and where its gradient goes: vectors (norm weights, biases) are
//! variables in candle's autograd; matrices (projections, embeddings, the head) stay plain
//! tensors whose gradients the fused ops add into a [`GradSink`] kept across steps.

use crate::train::sink::GradSink;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use std::sync::Arc;

pub struct Param {
    tensor: Tensor,
    var: Option<Var>,
    sink: Option<Arc<GradSink>>,
}

impl Param {
    /// A variable holding a private copy of `t` (f32).
    pub fn var(t: &Tensor) -> Result<Param> {
        let var = Var::from_tensor(t)?;
        Ok(Param {
            tensor: var.as_tensor().clone(),
            var: Some(var),
            sink: None,
        })
    }

    /// A plain tensor holding a private copy of the matrix `t` (f32), with a gradient buffer.
    pub fn matrix(t: &Tensor) -> Result<Param> {
        let (rows, cols) = t.dims2()?;
        Ok(Param {
            tensor: t.copy()?,
            var: None,
            sink: Some(Arc::new(GradSink::new(rows, cols))),
        })
    }

    pub fn as_tensor(&self) -> &Tensor {
        &self.tensor
    }

    pub fn dims(&self) -> &[usize] {
        self.tensor.dims()
    }

    pub fn elem_count(&self) -> usize {
        self.tensor.elem_count()
    }

    pub fn as_var(&self) -> Option<&Var> {
        self.var.as_ref()
    }

    pub fn sink(&self) -> Option<&Arc<GradSink>> {
        self.sink.as_ref()
    }

    /// Overwrites the values in place (resuming from a checkpoint), so every holder of the
    /// tensor sees them.
    pub fn set(&self, values: &Tensor) -> Result<()> {
        if values.dims() != self.dims() {
            bail!(
                "parameter has shape {:?}, the values {:?}",
                self.dims(),
                values.dims()
            );
        }
        let values = values.to_dtype(candle_core::DType::F32)?.contiguous()?;
        if let Some(v) = &self.var {
            // Any device (the portable path's variables may live on a GPU).
            return Ok(v.set(&values.to_device(v.device())?)?);
        }
        Ok(self.tensor.inplace_op2(&values, &CopyFrom)?)
    }
}

struct CopyFrom;

impl InplaceOp2 for CopyFrom {
    fn name(&self) -> &'static str {
        "copy-from"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let src = super::ops::f32_slice(src, src_l)?;
        let (CpuStorage::F32(d), Some((a, b))) = (dst, dst_l.contiguous_offsets()) else {
            candle_core::bail!("copy-from: the parameter is not a contiguous f32 tensor")
        };
        d[a..b].copy_from_slice(src);
        Ok(())
    }
}
