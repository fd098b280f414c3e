//! The decoder's building blocks: linear projections (with the decode-step and frozen-weight
//! kernels), RMS norms (Gemma's `1 + w` included) and one layer's attention and MLP weights.

use crate::io::config::{Activation, AttentionKind};
use crate::model::weight::Weight;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// A projection's part in training.
#[derive(Debug, Clone, Default)]
pub enum LinearGrad {
    /// Not training: the inference kernels.
    #[default]
    Infer,
    /// Training, weight frozen: backward computes the input's gradient only.
    Frozen,
    /// Training: backward also adds the weight's gradient into this buffer.
    Sink(std::sync::Arc<crate::train::sink::GradSink>),
    /// Training on the portable path (the GPU's): candle's matmul, recorded by its autograd
    /// (the weight's gradient is computed when the weight is a variable).
    Autograd,
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, as checkpoints store it, in its storage precision.
    pub weight: Weight,
    /// f32, whatever the weight's storage.
    pub bias: Option<Tensor>,
    /// Set by the trainer: how the training pass treats this weight.
    pub grad: LinearGrad,
    /// The paper's weight scaling, applied to the product before the bias (alpha·W·x + b):
    /// exact for every storage (a bf16 or quantized weight multiplied by alpha would be
    /// rounded or re-quantized), and undone by setting it back to 1.
    pub scale: f64,
    /// Set by the trainer: the arithmetic of the training pass's products (f32, or bf16 mixed
    /// precision).
    pub precision: crate::kernels::gemm::Precision,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            grad: LinearGrad::Infer,
            scale: 1.0,
            precision: Default::default(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = *dims.last().unwrap();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inner))?;
        let y = match self.weight.as_dense() {
            Some(w) if matches!(self.grad, LinearGrad::Autograd) => x2.matmul(&w.t()?)?,
            // A GPU: cuBLAS, in the compute dtype the weights were moved there in.
            _ if !x2.device().is_cpu() => self.weight.matmul_t(&x2)?,
            Some(w) if w.dtype() == DType::F32 => {
                use crate::train::ops::linear::linear;
                match &self.grad {
                    LinearGrad::Frozen => linear(&x2, w, None, self.precision)?,
                    LinearGrad::Sink(sink) => linear(&x2, w, Some(sink), self.precision)?,
                    LinearGrad::Infer | LinearGrad::Autograd => {
                        use crate::kernels::{gemm::linear_f32, matmul_small::matmul_wt};
                        match matmul_wt(&x2, w)? {
                            Some(y) => y, // a decode step's few rows: stream the weight once
                            None => match linear_f32(&x2, w)? {
                                Some(y) => y,
                                None => x2.matmul(&w.t()?)?,
                            },
                        }
                    }
                }
            }
            _ => self.weight.matmul_t(&x2)?,
        };
        let y = if self.scale != 1.0 {
            (y * self.scale)?
        } else {
            y
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dims().0;
        Ok(y.reshape(out)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// The weight as stored (Gemma stores w and multiplies by 1 + w).
    pub weight: Tensor,
    pub(crate) plus_one: bool,
    pub(crate) eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(weight: Tensor, plus_one: bool, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight,
            plus_one,
            eps,
        })
    }

    /// What the normalised input is multiplied by. Derived on every call (it is only a
    /// hidden-size vector) so that in-place weight updates during training are always seen.
    fn scale(&self) -> Result<Tensor> {
        Ok(if self.plus_one {
            (&self.weight + 1.0)?
        } else {
            self.weight.clone()
        })
    }

    /// Inference only (candle's norm has no backward; training uses `train::ops::norm`). In
    /// f32 whatever the activations' dtype, as transformers normalises bf16 activations.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let y = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.scale()?,
            self.eps as f32,
        )?;
        Ok(y.to_dtype(dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v projections stacked on the output dimension.
    pub qkv: Linear,
    pub o: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up projections stacked on the output dimension (gate first).
    pub gate_up: Linear,
    pub down: Linear,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_in_norm: RmsNorm,
    pub attn: Attention,
    /// Gemma2/3 `post_attention_layernorm`, applied to the attention output.
    pub attn_out_norm: Option<RmsNorm>,
    /// Pre-MLP norm (Llama's `post_attention_layernorm`, Gemma2/3's `pre_feedforward_layernorm`).
    pub mlp_in_norm: RmsNorm,
    pub mlp: Mlp,
    pub mlp_out_norm: Option<RmsNorm>,
    pub kind: AttentionKind,
    /// The residual target of the paper's scaling (`ScaleTarget::Residual`): the factor on this
    /// layer's attention and MLP contributions to the residual stream, after any post-norm.
    pub residual_scale: f64,
}

impl Layer {
    /// The four projections: q/k/v, o, gate/up, down.
    pub fn linears(&self) -> [&Linear; 4] {
        [
            &self.attn.qkv,
            &self.attn.o,
            &self.mlp.gate_up,
            &self.mlp.down,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.attn.qkv,
            &mut self.attn.o,
            &mut self.mlp.gate_up,
            &mut self.mlp.down,
        ]
    }
}

pub(crate) fn act(a: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match a {
        Activation::Silu => candle_nn::ops::silu(x)?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Gelu => x.gelu_erf()?,
    })
}
