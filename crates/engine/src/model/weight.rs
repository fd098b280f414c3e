//! A weight matrix in its storage precision: a dense f32, bf16 or f16 tensor, or GGUF quantized
//! blocks, never widened as a whole (the kernels widen a tile at a time).
//!
//! A fused projection (q/k/v, gate/up) is a stack of row blocks: a GGUF file may quantize its
//! pieces differently (Q4_K_M keeps v and some down projections at Q6_K), and re-quantizing them
//! to one type would change the weights. Neighbouring pieces of the same storage are joined.

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// One tensor as a checkpoint stores it.
#[derive(Debug, Clone)]
pub enum Block {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Block {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Block::Dense(t) => t.dims().to_vec(),
            Block::Quant(q) => q.shape().dims().to_vec(),
        }
    }

    /// The values as an f32 tensor (dequantized, or widened).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Block::Dense(t) => t.to_dtype(DType::F32)?,
            Block::Quant(q) => q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?,
        })
    }

    /// The storage type as llama.cpp and safetensors name it (`f32`, `bf16`, `Q4_K`).
    pub fn storage(&self) -> String {
        match self {
            Block::Dense(t) => t.dtype().as_str().to_string(),
            Block::Quant(q) => quant_name(q.dtype()),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Block::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Block::Quant(q) => q.storage_size_in_bytes(),
        }
    }

    /// The same rows in another order: row `r` of the result is row `from(r)` of this block.
    /// Quantized rows are moved as bytes (each row is whole blocks), so nothing is re-quantized.
    pub fn permute_rows(&self, from: impl Fn(usize) -> usize) -> Result<Block> {
        let dims = self.dims();
        let [rows, cols] = dims[..] else {
            bail!(
                "cannot permute the rows of a {}-dimensional tensor",
                dims.len()
            );
        };
        let order: Vec<u32> = (0..rows).map(|r| from(r) as u32).collect();
        Ok(match self {
            Block::Dense(t) => {
                let idx = Tensor::from_vec(order, rows, &Device::Cpu)?;
                Block::Dense(t.index_select(&idx, 0)?.contiguous()?)
            }
            Block::Quant(q) => {
                let data = q.data()?;
                let row = data.len() / rows;
                let mut out = Vec::with_capacity(data.len());
                for &r in &order {
                    out.extend_from_slice(&data[r as usize * row..(r as usize + 1) * row]);
                }
                Block::Quant(Arc::new(quant_from_bytes(out, q.dtype(), (rows, cols))?))
            }
        })
    }
}

/// llama.cpp's name of a GGML type (`Q4_K`, `Q8_0`).
pub fn quant_name(t: GgmlDType) -> String {
    match t {
        GgmlDType::Q2K => "Q2_K".into(),
        GgmlDType::Q3K => "Q3_K".into(),
        GgmlDType::Q4K => "Q4_K".into(),
        GgmlDType::Q5K => "Q5_K".into(),
        GgmlDType::Q6K => "Q6_K".into(),
        GgmlDType::Q8K => "Q8_K".into(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn quant_from_bytes(
    bytes: Vec<u8>,
    dtype: GgmlDType,
    shape: (usize, usize),
) -> Result<QTensor> {
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, shape)?)
}

/// A projection's `[out, in]` matrix: row blocks stacked on the output dimension.
#[derive(Debug, Clone)]
pub struct Weight {
    blocks: Vec<Block>,
    rows: usize,
    cols: usize,
}

impl Weight {
    /// A dense `[out, in]` tensor of any float dtype.
    pub fn dense(t: Tensor) -> Weight {
        let (rows, cols) = t.dims2().expect("a weight matrix is 2-D");
        Weight {
            blocks: vec![Block::Dense(t)],
            rows,
            cols,
        }
    }

    /// Row blocks stacked in order; neighbours of the same storage are joined into one.
    pub fn stack(parts: Vec<Block>) -> Result<Weight> {
        let mut blocks: Vec<Block> = Vec::with_capacity(parts.len());
        let (mut rows, mut cols) = (0, None);
        for p in parts {
            let dims = p.dims();
            let [r, c] = dims[..] else {
                bail!("a weight matrix must be 2-D, got shape {dims:?}");
            };
            if *cols.get_or_insert(c) != c {
                bail!(
                    "stacked weight pieces have {c} and {} columns",
                    cols.unwrap()
                );
            }
            rows += r;
            let joined = match (blocks.last(), &p) {
                (Some(Block::Dense(a)), Block::Dense(b)) if a.dtype() == b.dtype() => {
                    Some(Block::Dense(Tensor::cat(&[a, b], 0)?))
                }
                (Some(Block::Quant(a)), Block::Quant(b)) if a.dtype() == b.dtype() => {
                    let (ra, _) = a.shape().dims2()?;
                    let mut bytes = a.data()?.into_owned();
                    bytes.extend_from_slice(&b.data()?);
                    let q = quant_from_bytes(bytes, a.dtype(), (ra + r, c))?;
                    Some(Block::Quant(Arc::new(q)))
                }
                _ => None,
            };
            match joined {
                Some(j) => *blocks.last_mut().expect("joined to a last block") = j,
                None => blocks.push(p),
            }
        }
        let cols = cols.ok_or_else(|| anyhow!("a weight needs at least one piece"))?;
        Ok(Weight { blocks, rows, cols })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub fn elem_count(&self) -> usize {
        self.rows * self.cols
    }

    /// The dense tensor, when the weight is one dense block (every Hugging Face checkpoint).
    pub fn as_dense(&self) -> Option<&Tensor> {
        match &self.blocks[..] {
            [Block::Dense(t)] => Some(t),
            _ => None,
        }
    }

    /// The dense tensor, or an error for quantized storage (training and in-place edits need
    /// dense weights).
    pub fn tensor(&self) -> Result<&Tensor> {
        self.as_dense().ok_or_else(|| self.not_dense())
    }

    pub fn tensor_mut(&mut self) -> Result<&mut Tensor> {
        let err = self.not_dense();
        match &mut self.blocks[..] {
            [Block::Dense(t)] => Ok(t),
            _ => Err(err),
        }
    }

    fn not_dense(&self) -> anyhow::Error {
        anyhow!(
            "this needs dense weights, but the weight is stored as {} (load the model with \
             --dtype f32)",
            self.storage()
        )
    }

    /// The whole matrix in f32 (a copy; for small or one-off uses such as writing a checkpoint).
    pub fn to_f32(&self) -> Result<Tensor> {
        let parts = self
            .blocks
            .iter()
            .map(|b| b.to_f32())
            .collect::<Result<Vec<_>>>()?;
        Ok(if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        })
    }

    /// Storage of the blocks, joined with `+` when they differ (`Q4_K+Q6_K`).
    pub fn storage(&self) -> String {
        let mut names: Vec<String> = self.blocks.iter().map(|b| b.storage()).collect();
        names.dedup();
        names.join("+")
    }

    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.bytes()).sum()
    }

    /// The matrix on `device`, dense in `dtype` (quantized blocks dequantized first): the GPU
    /// runs every product through cuBLAS on one dense block.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Weight> {
        let parts = self
            .blocks
            .iter()
            .map(|b| -> Result<Tensor> {
                Ok(match b {
                    // Converted on the device: a bf16 checkpoint is not widened in host memory.
                    Block::Dense(t) => t.to_device(device)?.to_dtype(dtype)?,
                    Block::Quant(q) => q
                        .dequantize(&Device::Cpu)?
                        .to_device(device)?
                        .to_dtype(dtype)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let t = if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        Ok(Weight::dense(t))
    }

    /// Rows `ids` (u32, any shape) as f32: `[..ids, in]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.blocks[..] {
            [Block::Dense(t)] => Ok(t
                .index_select(&ids.flatten_all()?, 0)?
                .to_dtype(DType::F32)?),
            [Block::Quant(q)] => Ok(q.embedding(&ids.flatten_all()?)?.to_dtype(DType::F32)?),
            _ => Ok(self.to_f32()?.index_select(&ids.flatten_all()?, 0)?),
        }
    }
}

impl Weight {
    /// `x · Wᵀ` for f32 activations `x: [M, K]` (no gradient): `[M, N]` f32, each row block
    /// through the kernel of its storage.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            bail!("matmul: input has {k} columns, the weight {}", self.cols);
        }
        if !x.device().is_cpu() {
            // On a GPU the weight is one dense block in the compute dtype (`to_device`).
            let w = self.tensor()?;
            return Ok(x.to_dtype(w.dtype())?.matmul(&w.t()?)?);
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut outs = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let y = match b {
                Block::Dense(t) if t.dtype() == DType::F32 => {
                    use crate::kernels::{gemm::linear_f32, matmul_small::matmul_wt};
                    match matmul_wt(&x, t)? {
                        Some(y) => y,
                        None => match linear_f32(&x, t)? {
                            Some(y) => y,
                            None => x.matmul(&t.t()?)?,
                        },
                    }
                }
                _ => {
                    // The activations' values in place (x is a contiguous f32 CPU tensor).
                    let run = |xv: &[f32]| -> Result<(usize, Vec<f32>)> {
                        match b {
                            Block::Quant(q) => Ok((
                                q.shape().dims2()?.0,
                                crate::kernels::quant::matmul(xv, m, k, q)?,
                            )),
                            Block::Dense(t) => {
                                Ok((t.dim(0)?, crate::kernels::widen::matmul(xv, m, k, t)?))
                            }
                        }
                    };
                    let (n, v) = crate::kernels::matmul_small::with_f32(&x, run)
                        .ok_or_else(|| anyhow!("matmul: activations are not on the CPU"))??;
                    Tensor::from_vec(v, (m, n), x.device())?
                }
            };
            outs.push(y);
        }
        Ok(if outs.len() == 1 {
            outs.pop().expect("one block")
        } else {
            Tensor::cat(&outs, 1)?
        })
    }
}
