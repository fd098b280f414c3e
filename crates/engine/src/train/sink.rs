//! Gradient buffers of the large trainable matrices (projections, embeddings, output head),
//! kept across steps and written in place by the ops' backward passes.
//!
//! Left to candle's autograd, each weight gradient would be a fresh tensor (page-faulted and
//! zeroed), added into another fresh zero tensor in candle's gradient store, then added again
//! across micro-batches: three passes and two allocations over all the parameters per step, and
//! the store holds a second copy of every gradient at the end of backward. Here the first write
//! of a step overwrites the buffer and later ones add into it (gemm accumulates in place), so a
//! step costs no allocation and no zeroing.

use crate::kernels::gemm::{matmul, Mat};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

pub struct SinkGuard<'a> {
    grad: MutexGuard<'a, Vec<f32>>,
    written: bool,
}

impl SinkGuard<'_> {
    /// The gradient, if anything was written since the last `clear`.
    pub fn values(&self) -> Option<&[f32]> {
        self.written.then_some(self.grad.as_slice())
    }
}

pub struct GradSink {
    /// `[rows, cols]` row-major; valid only when `written`.
    grad: Mutex<Vec<f32>>,
    rows: usize,
    cols: usize,
    written: AtomicBool,
}

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradSink[{}, {}]", self.rows, self.cols)
    }
}

impl GradSink {
    pub fn new(rows: usize, cols: usize) -> GradSink {
        GradSink {
            grad: Mutex::new(vec![0.0; rows * cols]),
            rows,
            cols,
            written: AtomicBool::new(false),
        }
    }

    pub fn written(&self) -> bool {
        self.written.load(Ordering::Acquire)
    }

    /// The buffer, locked; its values are those accumulated since the last `clear`.
    pub fn lock(&self) -> SinkGuard<'_> {
        SinkGuard {
            grad: self.grad.lock().expect("grad sink lock"),
            written: self.written(),
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

    /// Starts a new accumulation (after the optimizer step).
    pub fn clear(&self) {
        self.written.store(false, Ordering::Release);
    }

    /// Runs `f` on the buffer with whether this write must overwrite it (the first write of an
    /// accumulation) or add into it.
    fn write(&self, f: impl FnOnce(&mut [f32], bool)) {
        let mut g = self.grad.lock().expect("grad sink lock");
        let overwrite = !self.written.swap(true, Ordering::AcqRel);
        f(&mut g, overwrite)
    }

    /// `grad += aᵀ · b` for row-major `a: [n, rows]`, `b: [n, cols]` (a projection's
    /// `dyᵀ · x`, or the head's `(softmax - onehot)ᵀ · h`).
    pub fn add_at_b(&self, a: &[f32], b: &[f32], n: usize) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        if a.len() != n * rows || b.len() != n * cols {
            bail!(
                "grad sink [{rows}, {cols}]: operands of {} and {} values for {n} rows",
                a.len(),
                b.len()
            );
        }
        self.write(|g, overwrite| {
            matmul(
                g,
                cols,
                Mat::new(a, n, rows).t(),
                Mat::new(b, n, cols),
                !overwrite,
                true,
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
        self.write(|g, overwrite| {
            if overwrite {
                g.fill(0.0);
            }
            for (&id, row) in ids.iter().zip(rows.chunks_exact(cols)) {
                let dst = &mut g[id as usize * cols..(id as usize + 1) * cols];
                dst.iter_mut().zip(row).for_each(|(d, x)| *d += scale * x);
            }
        });
        Ok(())
    }
}
