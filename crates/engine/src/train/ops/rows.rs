//! What the element-wise ops share: reading f32 rows of any layout whose last dimension is
//! packed (a transposed `[B, H, T, D]` view reads in place, no copy), and sizing rayon tasks.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// Fewer elements than this per rayon task and the hand-off costs more than the work.
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// Rows of `width` packed values at arbitrary (strided) starting offsets.
pub(crate) struct Rows {
    pub width: usize,
    pub count: usize,
    start: usize,
    /// Leading dimensions with their strides, innermost first; empty when rows are packed.
    lead: Vec<(usize, usize)>,
}

impl Rows {
    /// `None` when the last dimension is not packed (the caller then makes a contiguous copy).
    pub fn new(l: &Layout) -> Option<Rows> {
        let dims = l.dims();
        let strides = l.stride();
        let (&width, lead_dims) = dims.split_last()?;
        if width > 1 && strides[dims.len() - 1] != 1 {
            return None;
        }
        let count = lead_dims.iter().product();
        let lead = if l.is_contiguous() {
            Vec::new()
        } else {
            lead_dims
                .iter()
                .zip(strides)
                .rev()
                .map(|(&d, &s)| (d, s))
                .collect()
        };
        Some(Rows {
            width,
            count,
            start: l.start_offset(),
            lead,
        })
    }

    #[inline]
    pub fn offset(&self, mut r: usize) -> usize {
        if self.lead.is_empty() {
            return self.start + r * self.width;
        }
        let mut off = self.start;
        for &(d, s) in &self.lead {
            off += (r % d) * s;
            r /= d;
        }
        off
    }

    #[inline]
    pub fn row<'a>(&self, data: &'a [f32], r: usize) -> &'a [f32] {
        let o = self.offset(r);
        &data[o..o + self.width]
    }
}

/// Rows per rayon task: enough elements to amortise the hand-off, and few enough tasks that a
/// per-task partial sum (the norm's weight gradient) stays cheap to reduce.
pub(crate) fn rows_per_task(rows: usize, width: usize) -> usize {
    let min_rows = MIN_TASK_ELEMS.div_ceil(width.max(1));
    let by_threads = rows.div_ceil(rayon::current_num_threads() * 4);
    min_rows.max(by_threads).max(1)
}

pub(crate) fn f32_data<'a>(s: &'a CpuStorage, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => bail!("{op}: only f32 is supported, got {:?}", other.dtype()),
    }
}

/// The contiguous f32 values of a custom op's input.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("training op: input is not contiguous")
    };
    Ok(&f32_data(s, "training op")?[a..b])
}

/// As [`f32_slice`], for a tensor's storage (in a backward pass).
pub(crate) fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l),
        _ => bail!("training op: tensor is not on the CPU"),
    }
}

/// A custom op's input as f32 values and their rows (which must be packed).
pub(crate) fn input_rows<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], Rows)> {
    let Some(rows) = Rows::new(l) else {
        bail!("{op}: input rows must be packed")
    };
    Ok((f32_data(s, op)?, rows))
}

/// The tensor itself when its rows can be read in place, else a contiguous copy.
pub(crate) fn rows_readable(t: &Tensor) -> Result<Tensor> {
    let packed_last = t.dims().last().is_none_or(|&w| w <= 1) || t.stride().last() == Some(&1);
    if packed_last {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Runs `f` on the f32 data and row view of a CPU tensor (copied first only if its last
/// dimension is strided).
pub(crate) fn with_rows<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32], &Rows) -> Result<R>,
) -> Result<R> {
    let t = rows_readable(t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: only CPU tensors are supported")
    };
    let Some(rows) = Rows::new(layout) else {
        bail!("{op}: expected a tensor with at least one dimension")
    };
    f(f32_data(cpu, op)?, &rows)
}

/// `y += x`, threaded (the residual path of the fused blocks, forward and backward).
pub(crate) fn add_into(y: &mut [f32], x: &[f32]) {
    use rayon::prelude::*;
    y.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &a)| *o += a);
}

/// The data of a tensor (a weight, a cos/sin table, a gradient) as one packed slice, copied
/// first only if it is not contiguous.
pub(crate) fn with_packed<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: only CPU tensors are supported")
    };
    let start = layout.start_offset();
    f(&f32_data(cpu, op)?[start..start + t.elem_count()])
}

/// max |a - b| / max |b|: the tests' relative error, scaled by the reference's magnitude.
#[cfg(test)]
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-30))
}

/// The tests' comparison of an op with its composed reference: the relative error of the
/// values, and of each of `vars`' gradients under the backward pass of `sum(y · coef)`; also the
/// op's gradients, for further checks.
#[cfg(test)]
pub(crate) fn value_and_grad_errs(
    y: &Tensor,
    y_ref: &Tensor,
    coef: &Tensor,
    vars: &[&Tensor],
) -> anyhow::Result<(f32, Vec<f32>, candle_core::backprop::GradStore)> {
    let value = rel_err(y, y_ref)?;
    let g_ref = (y_ref * coef)?.sum_all()?.backward()?;
    let g = (y * coef)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .map(|v| {
            rel_err(
                g.get(v).expect("op gradient"),
                g_ref.get(v).expect("reference"),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((value, grads, g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn strided_rows_match_the_contiguous_copy() -> anyhow::Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0, &Device::Cpu)?
            .reshape((2, 3, 4, 5))?
            .transpose(1, 2)?
            .narrow(3, 1, 3)?;
        let c = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        with_rows(&x, "test", |data, rows| {
            assert!(
                !rows.lead.is_empty(),
                "a transposed view must be read strided"
            );
            assert_eq!((rows.count, rows.width), (24, 3));
            for r in 0..rows.count {
                assert_eq!(rows.row(data, r), &c[r * 3..r * 3 + 3], "row {r}");
            }
            Ok(())
        })?;
        Ok(())
    }
}
