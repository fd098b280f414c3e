//! Gradient buffers of the large trainable matrices (projections, embeddings, output head),
//! written in place by the ops' backward passes.
//!
//! Left to candle's autograd, each weight gradient would be a fresh tensor, added into another
//! fresh zero tensor in candle's gradient store, then added again across micro-batches: three
//! passes and two allocations over all the parameters per step, and the store holds a second
//! copy of every gradient at the end of backward. Here the first write of a step allocates the
//! buffer (memory the activations freed a moment earlier in the same backward pass) and later
//! writes add into it (gemm accumulates in place). The optimizer step frees it again, as torch's
//! `zero_grad` does, so the next forward pass has that memory for its activations.

use crate::kernels::gemm::{matmul_in, Mat, Precision};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::{Mutex, MutexGuard};

pub struct SinkGuard<'a> {
    grad: MutexGuard<'a, Option<Vec<f32>>>,
}

impl SinkGuard<'_> {
    /// The gradient, if anything was written since the last `clear`.
    pub fn values(&self) -> Option<&[f32]> {
        self.grad.as_deref()
    }
}

pub struct GradSink {
    /// `[rows, cols]` row-major, when anything was written since the last `clear`.
    grad: Mutex<Option<Vec<f32>>>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradSink[{}, {}]", self.rows, self.cols)
    }
}

impl GradSink {
    pub fn new(rows: usize, cols: usize) -> GradSink {
        GradSink {
            grad: Mutex::new(None),
            rows,
            cols,
        }
    }

    /// The buffer, locked; its values are those accumulated since the last `clear`.
    pub fn lock(&self) -> SinkGuard<'_> {
        SinkGuard {
            grad: self.grad.lock().expect("grad sink lock"),
        }
    }

    /// The accumulated gradient as a tensor (a copy; for tests and inspection).
    pub fn to_tensor(&self) -> Result<Option<Tensor>> {
        let g = self.lock();
        let shape = (self.rows, self.cols);
        Ok(match g.values() {
            Some(v) => Some(Tensor::from_slice(v, shape, &candle_core::Device::Cpu)?),
            None => None,
        })
    }

    /// Frees the gradient (after the optimizer step).
    pub fn clear(&self) {
        *self.grad.lock().expect("grad sink lock") = None;
    }

    /// Runs `f` on the buffer with whether this write is the accumulation's first or adds into
    /// earlier values. A first write starts from zeros, or, with `overwrites`, from a buffer
    /// that is not zeroed, which `f` must then set whole without reading it (half a gigabyte
    /// of memset per step for SmolLM2-135M's projections otherwise).
    fn write(&self, overwrites: bool, f: impl FnOnce(&mut [f32], bool)) {
        let mut g = self.grad.lock().expect("grad sink lock");
        let first = g.is_none();
        let n = self.rows * self.cols;
        let buf = g.get_or_insert_with(|| {
            if overwrites {
                // SAFETY: the caller's `f` writes all n values before reading any (above).
                unsafe { crate::kernels::mem::for_overwrite(n) }
            } else {
                crate::kernels::mem::zeros_written(n)
            }
        });
        f(buf, first)
    }

    /// `grad += aᵀ · b` for row-major `a: [n, rows]`, `b: [n, cols]` (a projection's
    /// `dyᵀ · x`, or the head's `(softmax - onehot)ᵀ · h`).
    /// `parallel`: threaded gemm (false when the caller runs other work beside it).
    pub fn add_at_b(
        &self,
        a: &[f32],
        b: &[f32],
        n: usize,
        parallel: bool,
        precision: Precision,
    ) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        if a.len() != n * rows || b.len() != n * cols {
            bail!(
                "grad sink [{rows}, {cols}]: operands of {} and {} values for {n} rows",
                a.len(),
                b.len()
            );
        }
        // A first write is a plain product (`accumulate` false), which in f32 sets every value
        // of the destination without reading it (`gemm::matmul_new`): `write`'s contract for
        // `overwrites`. The bf16 paths may add into it, so they get zeros.
        self.write(precision == Precision::F32, |g, first| {
            matmul_in(
                precision,
                g,
                cols,
                Mat::new(a, n, rows).t(),
                Mat::new(b, n, cols),
                !first,
                parallel,
            )
        });
        Ok(())
    }

    /// `grad[ids[r]] += scale · rows[r]` (the embedding lookup's backward).
    pub fn add_rows(&self, ids: &[u32], rows: &[f32], scale: f32) -> Result<()> {
        let cols = self.cols;
        if rows.len() != ids.len() * cols {
            bail!(
                "grad sink: {} values for {} rows of {cols}",
                rows.len(),
                ids.len()
            );
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.rows) {
            bail!(
                "grad sink: token {id} outside the vocabulary of {}",
                self.rows
            );
        }
        self.write(false, |g, _| {
            for (&id, row) in ids.iter().zip(rows.chunks_exact(cols)) {
                let dst = &mut g[id as usize * cols..(id as usize + 1) * cols];
                dst.iter_mut().zip(row).for_each(|(d, x)| *d += scale * x);
            }
        });
        Ok(())
    }
}
