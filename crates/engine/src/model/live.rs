//! The real-token rows of a padded call. A left-padded batch computes its padding positions
//! through every projection although nothing reads them: a padding key is masked from every real
//! query, and a padding query sees only itself. On the CPU the projections run on the real rows
//! only, gathered into one matrix; their products are scattered back with zeros in the padding
//! rows (a padding query then attends to a zero key and value and stays finite).

use crate::model::mask::PadLayout;
use crate::train::ops::with_rows;
use anyhow::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Where a padding row sits in `slot`.
const PAD: u32 = u32::MAX;

/// Fewer floats than this per rayon task and the hand-off costs more than the copy.
const MIN_TASK_FLOATS: usize = 16 * 1024;

/// The live rows of a `[B, T]` call, in order (row-major over batch rows and positions).
#[derive(Debug, Clone)]
pub struct LiveRows {
    /// Index into `[B * T]` of each live row.
    src: Vec<u32>,
    /// For each of the `B * T` rows, its index among the live rows, or `PAD`.
    slot: Vec<u32>,
}

impl LiveRows {
    /// `None` when every row is a real token (nothing to skip).
    pub fn of(layout: &PadLayout, pads: &[usize]) -> Option<LiveRows> {
        let t = layout.new_tokens;
        let mut src = Vec::new();
        let mut slot = Vec::with_capacity(pads.len() * t);
        for (r, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                if layout.is_pad(layout.past + i, pad) {
                    slot.push(PAD);
                } else {
                    slot.push(src.len() as u32);
                    src.push((r * t + i) as u32);
                }
            }
        }
        (src.len() < slot.len()).then_some(LiveRows { src, slot })
    }

    /// `x: [B, T, ...]` (any layout whose last dimension is packed, such as attention's
    /// `[B, T, heads, D]` transposed view) → `[live, W]`, W the product of the dimensions after T.
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.elem_count() / self.slot.len().max(1);
        // candle's ops where a gradient must flow through (the copies below would cut it).
        if !x.device().is_cpu() || x.dtype() != DType::F32 || x.track_op() {
            let idx = Tensor::new(self.src.as_slice(), x.device())?;
            let flat = x.contiguous()?.reshape((self.slot.len(), w))?;
            return Ok(flat.index_select(&idx, 0)?);
        }
        let mut out = vec![0f32; self.src.len() * w];
        with_rows(x, "live rows", |data, rows| {
            // Each position is `per` rows of the view (its heads).
            let per = w / rows.width.max(1);
            out.par_chunks_mut(w)
                .with_min_len(min_rows(w))
                .zip(self.src.par_iter())
                .for_each(|(o, &r)| {
                    for (j, part) in o.chunks_exact_mut(rows.width).enumerate() {
                        part.copy_from_slice(rows.row(data, r as usize * per + j));
                    }
                });
            Ok(())
        })?;
        Ok(Tensor::from_vec(out, (self.src.len(), w), x.device())?)
    }

    /// `y: [live, W]` → `[B, T, W]` with zeros in the padding rows.
    pub fn scatter(&self, y: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let w = y.dim(1)?;
        if !y.device().is_cpu() || y.dtype() != DType::F32 || y.track_op() {
            let idx = Tensor::new(self.src.as_slice(), y.device())?;
            let zeros = Tensor::zeros((self.slot.len(), w), y.dtype(), y.device())?;
            return Ok(zeros.index_add(&idx, y, 0)?.reshape((b, t, w))?);
        }
        let mut out = vec![0f32; self.slot.len() * w];
        with_rows(y, "live rows", |data, rows| {
            out.par_chunks_mut(w)
                .with_min_len(min_rows(w))
                .zip(self.slot.par_iter())
                .for_each(|(o, &s)| {
                    if s != PAD {
                        o.copy_from_slice(rows.row(data, s as usize));
                    }
                });
            Ok(())
        })?;
        Ok(Tensor::from_vec(out, (b, t, w), y.device())?)
    }
}

fn min_rows(width: usize) -> usize {
    MIN_TASK_FLOATS.div_ceil(width.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layout(past: usize, new_tokens: usize, shared: usize) -> PadLayout {
        PadLayout {
            shared,
            past,
            new_tokens,
        }
    }

    #[test]
    fn gather_then_scatter_keeps_real_rows_and_zeroes_padding() -> Result<()> {
        let (b, t, w) = (3, 5, 6);
        let pads = [2, 0, 4];
        let l = layout(0, t, 0);
        let live = LiveRows::of(&l, &pads).expect("some rows are padding");
        assert_eq!(live.src.len(), 3 + 5 + 1);
        let x = Tensor::arange(0f32, (b * t * w) as f32, &Device::Cpu)?.reshape((b, t, w))?;
        let g = live.gather(&x)?;
        assert_eq!(g.dims(), &[9, w]);
        // Row 0's first real token is position 2: flat row 2.
        assert_eq!(
            g.get(0)?.to_vec1::<f32>()?,
            x.get(0)?.get(2)?.to_vec1::<f32>()?
        );
        let back = live.scatter(&g, b, t)?;
        let (xv, bv) = (x.to_vec3::<f32>()?, back.to_vec3::<f32>()?);
        for (r, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                let want = if i < pad {
                    vec![0f32; w]
                } else {
                    xv[r][i].clone()
                };
                assert_eq!(bv[r][i], want, "row {r} position {i}");
            }
        }
        // A strided view (a transpose) gathers the same rows as its contiguous copy.
        let xt = x.transpose(0, 1)?.contiguous()?.transpose(0, 1)?;
        assert!(!xt.is_contiguous());
        assert_eq!(live.gather(&xt)?.to_vec2::<f32>()?, g.to_vec2::<f32>()?);
        // Attention's output: heads transposed behind the positions, read as one row each.
        let heads = x
            .reshape((b, t, 2, w / 2))?
            .transpose(1, 2)?
            .contiguous()?
            .transpose(1, 2)?;
        assert!(!heads.is_contiguous());
        assert_eq!(live.gather(&heads)?.to_vec2::<f32>()?, g.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn the_portable_path_agrees() -> Result<()> {
        let (b, t, w) = (2, 4, 3);
        let pads = [1, 3];
        let live = LiveRows::of(&layout(0, t, 0), &pads).expect("padding");
        let x = Tensor::arange(0f32, (b * t * w) as f32, &Device::Cpu)?.reshape((b, t, w))?;
        let fast = live.gather(&x)?;
        let slow = live
            .gather(&x.to_dtype(DType::F64)?)?
            .to_dtype(DType::F32)?;
        assert_eq!(fast.to_vec2::<f32>()?, slow.to_vec2::<f32>()?);
        let fast = live.scatter(&fast, b, t)?;
        let slow = live
            .scatter(&slow.to_dtype(DType::F64)?, b, t)?
            .to_dtype(DType::F32)?;
        assert_eq!(fast.to_vec3::<f32>()?, slow.to_vec3::<f32>()?);
        Ok(())
    }

    #[test]
    fn a_gradient_flows_through_to_the_real_rows() -> Result<()> {
        let live = LiveRows::of(&layout(0, 3, 0), &[1, 0]).expect("padding");
        let x = candle_core::Var::from_tensor(&Tensor::ones((2, 3, 2), DType::F32, &Device::Cpu)?)?;
        let y = live.scatter(&(live.gather(x.as_tensor())? * 3.0)?, 2, 3)?;
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("a gradient").to_vec3::<f32>()?;
        assert_eq!(gx[0], vec![vec![0.0; 2], vec![3.0; 2], vec![3.0; 2]]);
        assert_eq!(gx[1], vec![vec![3.0; 2]; 3]);
        Ok(())
    }

    #[test]
    fn rows_after_the_padding_or_a_cache_are_all_live() {
        // Decode steps after a padded prompt: the new positions are never padding.
        assert!(LiveRows::of(&layout(9, 1, 0), &[3, 0, 5]).is_none());
        // No padding at all.
        assert!(LiveRows::of(&layout(0, 6, 0), &[0, 0]).is_none());
        // Padding after a shared head: positions past the head are padding up to `pad`.
        let live = LiveRows::of(&layout(4, 3, 4), &[2, 0]).expect("padding");
        assert_eq!(live.src, vec![2, 3, 4, 5]);
    }
}
