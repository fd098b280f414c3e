//! A packed batch's attention block as one op: the qkv projection's output `[N, W]` in, the
//! heads' outputs `[N, NH * D]` out, with rotary embeddings applied to q and k inside.
//!
//! Composed from candle ops, the block was three narrows of qkv, their reshapes and
//! transposes, two rope ops, and per sequence three more narrows, an attention op and a cat.
//! Candle's backward gives every narrow's input a gradient of its full size (zeros around the
//! slice), then adds each into the sum for that input, which it starts from another zeros
//! tensor: twelve full-size zero-fill-and-add passes per layer on one thread, 15% of a
//! SmolLM2-135M training step on the 2-core Xeon. Here backward writes `d(qkv)` once.

use super::{FusedAttention, Seg, View};
use crate::train::ops::rope::rotate_row;
use crate::train::ops::rows::{rows_per_task, with_packed};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Heads and rotary dims of the block.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    /// Leading dims of each q/k head that rotate (the rest pass through).
    pub rot_dim: usize,
}

pub(super) struct PackedAttention {
    inner: FusedAttention,
    heads: Heads,
    /// `[N, rot_dim / 2]` at each packed row's position.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// q and k after rotation, `[NH, N, D]` and `[NKV, N, D]`, kept for backward.
    rotated: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl PackedAttention {
    /// The op for the packed sequences `seqs` (arguments as [`packed_attention`] takes them).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        seqs: &[(usize, usize)],
        masks: &[&[f32]],
        cos: &Tensor,
        sin: &Tensor,
        heads: Heads,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<PackedAttention> {
        if !heads.rot_dim.is_multiple_of(2) || heads.rot_dim > heads.hd {
            bail!(
                "packed attention: rot_dim {} for heads of {}",
                heads.rot_dim,
                heads.hd
            );
        }
        if masks.len() != seqs.len() {
            bail!(
                "packed attention: {} masks for {} sequences",
                masks.len(),
                seqs.len()
            );
        }
        let mut segs = Vec::with_capacity(seqs.len());
        let mut mask = Vec::new();
        for (&(start, len), m) in seqs.iter().zip(masks) {
            if m.len() != len * len {
                bail!(
                    "packed attention: a mask of {} values for a sequence of {len}",
                    m.len()
                );
            }
            segs.push(Seg {
                b: 0,
                q0: start,
                t: len,
                k0: start,
                s: len,
            });
            mask.extend_from_slice(m);
        }
        let table = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        Ok(PackedAttention {
            inner: FusedAttention::new(segs, mask, scale, softcap)?,
            heads,
            cos: table(cos)?,
            sin: table(sin)?,
            rotated: Mutex::new(None),
        })
    }

    /// The block's heads and rotary dims.
    pub(super) fn heads(&self) -> Heads {
        self.heads
    }

    /// The heads' outputs `[n, NH · D]` of the packed `qkv: [n, w]`; keeps what backward needs.
    pub(super) fn forward(&self, qkv: &[f32], w: usize, n: usize) -> candle_core::Result<Vec<f32>> {
        self.rows(w, n)?;
        let Heads { nh, nkv, .. } = self.heads;
        let (q, k) = (
            self.rotate_heads(qkv, w, 0, nh),
            self.rotate_heads(qkv, w, nh, nkv),
        );
        let dm = self.dims(n)?;
        let (qv, kv, vv) = self.views((&q, &k, qkv), w);
        let (out, saved) = self.inner.forward(&qv, &kv, &vv, dm);
        *self.inner.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        *self.rotated.lock().unwrap_or_else(|e| e.into_inner()) = Some((q, k));
        Ok(out)
    }

    /// `d(qkv)` `[n, w]` from the outputs' gradient `g: [n, NH · D]`.
    pub(super) fn backward(
        &self,
        qkv: &[f32],
        w: usize,
        n: usize,
        g: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let Heads { nh, nkv, hd, .. } = self.heads;
        let (q, k) = self.rotated(qkv, w);
        let dm = self.dims(n)?;
        let views = self.views((&q, &k, qkv), w);
        let taken = self
            .inner
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let saved = match taken {
            Some(s) => s,
            None => self.inner.forward(&views.0, &views.1, &views.2, dm).1,
        };
        let (dq, dk, dv) = self
            .inner
            .backward((&views.0, &views.1, &views.2), g, &saved, dm);
        drop(saved);
        // d(qkv): each row's q and k heads rotated back, its v heads as they are.
        let half = self.heads.rot_dim / 2;
        let mut dx = vec![0f32; n * w];
        let per = rows_per_task(n, w);
        dx.par_chunks_mut(per * w)
            .enumerate()
            .for_each(|(ci, chunk)| {
                for (j, row) in chunk.chunks_exact_mut(w).enumerate() {
                    let r = ci * per + j;
                    let (c, s) = (
                        &self.cos[r * half..(r + 1) * half],
                        &self.sin[r * half..(r + 1) * half],
                    );
                    let (dqr, rest) = row.split_at_mut(nh * hd);
                    let (dkr, dvr) = rest.split_at_mut(nkv * hd);
                    for (h, y) in dqr.chunks_exact_mut(hd).enumerate() {
                        let at = (h * n + r) * hd;
                        rotate_row(&dq[at..at + hd], c, s, -1.0, y);
                    }
                    for (h, (yk, yv)) in dkr
                        .chunks_exact_mut(hd)
                        .zip(dvr.chunks_exact_mut(hd))
                        .enumerate()
                    {
                        let at = (h * n + r) * hd;
                        rotate_row(&dk[at..at + hd], c, s, -1.0, yk);
                        yv.copy_from_slice(&dv[at..at + hd]);
                    }
                }
            });
        Ok(dx)
    }

    fn rows(&self, w: usize, n: usize) -> candle_core::Result<()> {
        let Heads { nh, nkv, hd, .. } = self.heads;
        if w != (nh + 2 * nkv) * hd || self.cos.len() * 2 != n * self.heads.rot_dim {
            candle_core::bail!(
                "packed attention: qkv of width {w} and {} rope values for {n} rows, heads \
                 {:?}",
                self.cos.len(),
                self.heads
            );
        }
        Ok(())
    }

    /// Rotates `count` heads from column `head0 · D` of every row of `qkv: [N, W]` into a
    /// `[count, N, D]` buffer.
    fn rotate_heads(&self, qkv: &[f32], w: usize, head0: usize, count: usize) -> Vec<f32> {
        let (hd, half) = (self.heads.hd, self.heads.rot_dim / 2);
        let n = qkv.len() / w;
        let mut out = vec![0f32; count * n * hd];
        let per = rows_per_task(count * n, hd);
        out.par_chunks_mut(per * hd)
            .enumerate()
            .for_each(|(ci, chunk)| {
                for (j, y) in chunk.chunks_exact_mut(hd).enumerate() {
                    let (h, r) = ((ci * per + j) / n, (ci * per + j) % n);
                    let src = r * w + (head0 + h) * hd;
                    let (c, s) = (
                        &self.cos[r * half..(r + 1) * half],
                        &self.sin[r * half..(r + 1) * half],
                    );
                    rotate_row(&qkv[src..src + hd], c, s, 1.0, y);
                }
            });
        out
    }

    /// q, k rotated (kept from the forward, or made again for a second backward).
    fn rotated(&self, qkv: &[f32], w: usize) -> (Vec<f32>, Vec<f32>) {
        let taken = self
            .rotated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        taken.unwrap_or_else(|| {
            let Heads { nh, nkv, .. } = self.heads;
            (
                self.rotate_heads(qkv, w, 0, nh),
                self.rotate_heads(qkv, w, nh, nkv),
            )
        })
    }

    /// The inner op's views: q and k from their rotated buffers, v in place in qkv.
    fn views<'a>(
        &self,
        (q, k, qkv): (&'a [f32], &'a [f32], &'a [f32]),
        w: usize,
    ) -> (View<'a>, View<'a>, View<'a>) {
        let Heads { nh, nkv, hd, .. } = self.heads;
        let n = qkv.len() / w;
        (
            View::from_parts(q, 0, [nh * n * hd, n * hd, hd, 1]),
            View::from_parts(k, 0, [nkv * n * hd, n * hd, hd, 1]),
            View::from_parts(qkv, (nh + nkv) * hd, [n * w, hd, w, 1]),
        )
    }

    fn dims(&self, n: usize) -> candle_core::Result<super::Dims> {
        let Heads { nh, nkv, hd, .. } = self.heads;
        let kv = [1, nkv, n, hd];
        self.inner.dims(&[1, nh, n, hd], &kv, &kv)
    }
}

/// `qkv` as a contiguous `[N, W]` slice.
fn qkv_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let (n, w) = l.shape().dims2()?;
    match l.contiguous_offsets() {
        Some((a, b)) if n * w == b - a => Ok((&s.as_slice::<f32>()?[a..b], w)),
        _ if n * w == 0 => candle_core::bail!("packed attention: empty qkv {:?}", l.dims()),
        _ => candle_core::bail!("packed attention: qkv must be contiguous"),
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (qkv, w) = qkv_slice(s, l)?;
        let n = l.dims()[0];
        let out = self.forward(qkv, w, n)?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, self.heads.nh * self.heads.hd)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cpu(xs) = &*xs else {
            candle_core::bail!("packed attention: qkv is not on the CPU")
        };
        let (qkv, w) = qkv_slice(xs, xl)?;
        let n = xl.dims()[0];
        let grad = grad.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let dx = with_packed(&grad, "packed attention", |g| self.backward(qkv, w, n, g))?;
        Ok(Some(Tensor::from_vec(dx, (n, w), x.device())?))
    }
}

/// Causal attention over the sequences of a packed batch, from the qkv projection:
/// `qkv: [N, (NH + 2 NKV) · D]` f32 on the CPU (q heads, then k, then v), `seqs` the
/// (first row, length) of each sequence, `masks` each sequence's `[len, len]` additive mask,
/// `cos`/`sin: [1, N, rot_dim / 2]` at each row's position. q and k are rotated
/// (rotate-half), then each sequence attends within itself as [`super::attention`] computes
/// it. Returns `[N, NH · D]`; the gradient flows to `qkv`.
#[allow(clippy::too_many_arguments)]
pub fn packed_attention(
    qkv: &Tensor,
    seqs: &[(usize, usize)],
    masks: &[&[f32]],
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    if qkv.dtype() != candle_core::DType::F32 || !qkv.device().is_cpu() {
        bail!("packed attention: qkv must be an f32 CPU tensor");
    }
    let op = PackedAttention::new(seqs, masks, cos, sin, heads, scale, softcap)?;
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use crate::model::mask::PadLayout;
    use crate::train::ops::rope::rope;
    use crate::train::ops::rows::value_and_grad_errs;
    use candle_core::{Device, Var};

    /// The block as the decoder composed it before this op: narrows of qkv into heads, the
    /// rope op on q and k, then per sequence the attention op on narrows, and a cat.
    #[allow(clippy::too_many_arguments)]
    fn composed(
        qkv: &Tensor,
        seqs: &[(usize, usize)],
        masks: &[&[f32]],
        cos: &Tensor,
        sin: &Tensor,
        h: Heads,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        let n = qkv.dim(0)?;
        let heads = |start: usize, count: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, start * h.hd, count * h.hd)?
                .reshape((1, n, count, h.hd))?
                .transpose(1, 2)?)
        };
        let q = rope(&heads(0, h.nh)?, cos, sin, h.rot_dim)?;
        let k = rope(&heads(h.nh, h.nkv)?, cos, sin, h.rot_dim)?;
        let v = heads(h.nh + h.nkv, h.nkv)?;
        let mut outs = Vec::new();
        for (&(start, len), m) in seqs.iter().zip(masks) {
            let seq = |t: &Tensor| t.narrow(2, start, len);
            outs.push(super::super::attention(
                &seq(&q)?,
                &seq(&k)?,
                &seq(&v)?,
                m,
                scale,
                softcap,
            )?);
        }
        Ok(Tensor::cat(&outs, 1)?.reshape((n, h.nh * h.hd))?)
    }

    /// What `Packed` makes for sequences of `lens`: cos and sin `[1, N, rot/2]` at each row's
    /// position in its sequence, the sequences' (first row, length), their causal masks.
    #[allow(clippy::type_complexity)]
    pub(in crate::train::ops::attention) fn packed_setup(
        h: Heads,
        lens: &[usize],
        window: Option<usize>,
    ) -> Result<(Tensor, Tensor, Vec<(usize, usize)>, Vec<Vec<f32>>)> {
        let (n, dev): (usize, _) = (lens.iter().sum(), &Device::Cpu);
        let half = h.rot_dim / 2;
        let angles: Vec<f32> = lens
            .iter()
            .flat_map(|&len| 0..len)
            .flat_map(|p| (0..half).map(move |i| p as f32 * 0.3f32.powi(i as i32)))
            .collect();
        let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect(), (1, n, half), dev)?;
        let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect(), (1, n, half), dev)?;
        let (mut seqs, mut start) = (Vec::new(), 0);
        for &len in lens {
            seqs.push((start, len));
            start += len;
        }
        let masks = lens
            .iter()
            .map(|&len| {
                let layout = PadLayout {
                    shared: 0,
                    past: 0,
                    new_tokens: len,
                };
                layout.additive_mask(&[0], window)
            })
            .collect();
        Ok((cos, sin, seqs, masks))
    }

    fn check(h: Heads, lens: &[usize], window: Option<usize>, softcap: Option<f64>) -> Result<()> {
        let n: usize = lens.iter().sum();
        let w = (h.nh + 2 * h.nkv) * h.hd;
        let dev = &Device::Cpu;
        let qkv = Var::from_tensor(&Tensor::from_vec(pseudo(n * w, 3), (n, w), dev)?)?;
        let (cos, sin, seqs, owned) = packed_setup(h, lens, window)?;
        let masks: Vec<&[f32]> = owned.iter().map(|m| m.as_slice()).collect();
        let (scale, x) = (0.3, qkv.as_tensor());
        let ours = packed_attention(x, &seqs, &masks, &cos, &sin, h, scale, softcap)?;
        let theirs = composed(x, &seqs, &masks, &cos, &sin, h, scale, softcap)?;
        let coef = Tensor::from_vec(pseudo(n * h.nh * h.hd, 11), ours.shape(), dev)?;
        let (value, grads, _) = value_and_grad_errs(&ours, &theirs, &coef, &[x])?;
        assert!(value < 1e-5, "value error {value}");
        assert!(grads[0] < 1e-5, "d(qkv) error {}", grads[0]);
        Ok(())
    }

    #[test]
    fn equals_the_composed_block() -> Result<()> {
        let h = Heads {
            nh: 4,
            nkv: 2,
            hd: 8,
            rot_dim: 8,
        };
        check(h, &[5, 9, 1, 7], None, None)?;
        // Partial rotary, one kv head for all, a soft-cap, a sliding window.
        let partial = Heads {
            nh: 3,
            nkv: 1,
            hd: 10,
            rot_dim: 6,
        };
        check(partial, &[6, 11], Some(4), Some(2.0))?;
        check(h, &[13], Some(3), None)
    }

    #[test]
    fn second_backward_matches_first() -> Result<()> {
        let h = Heads {
            nh: 2,
            nkv: 2,
            hd: 4,
            rot_dim: 4,
        };
        let dev = &Device::Cpu;
        let (n, w) = (7, 24);
        let qkv = Var::from_tensor(&Tensor::from_vec(pseudo(n * w, 5), (n, w), dev)?)?;
        let cos = Tensor::ones((1, n, 2), candle_core::DType::F32, dev)?;
        let sin = Tensor::zeros((1, n, 2), candle_core::DType::F32, dev)?;
        let m = PadLayout {
            shared: 0,
            past: 0,
            new_tokens: n,
        }
        .additive_mask(&[0], None);
        let y = packed_attention(qkv.as_tensor(), &[(0, n)], &[&m], &cos, &sin, h, 0.5, None)?;
        let loss = (&y * &y)?.sum_all()?;
        let a = loss
            .backward()?
            .get(qkv.as_tensor())
            .expect("grad")
            .flatten_all()?;
        let b = loss
            .backward()?
            .get(qkv.as_tensor())
            .expect("grad")
            .flatten_all()?;
        assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn rejects_mismatched_inputs() -> Result<()> {
        let h = Heads {
            nh: 2,
            nkv: 1,
            hd: 4,
            rot_dim: 4,
        };
        let dev = &Device::Cpu;
        let qkv = Tensor::zeros((3, 16), candle_core::DType::F32, dev)?;
        let cos = Tensor::zeros((1, 3, 2), candle_core::DType::F32, dev)?;
        let m = vec![0f32; 9];
        let call = |seqs: &[(usize, usize)], masks: &[&[f32]], t: &Tensor| {
            packed_attention(t, seqs, masks, &cos, &cos, h, 1.0, None)
        };
        assert!(call(&[(0, 3)], &[&m], &qkv).is_ok());
        // Wrong width, a mask of the wrong size, a sequence past the rows, a missing mask.
        let wide = Tensor::zeros((3, 20), candle_core::DType::F32, dev)?;
        assert!(call(&[(0, 3)], &[&m], &wide).is_err());
        assert!(call(&[(0, 3)], &[&m[..4]], &qkv).is_err());
        assert!(call(&[(1, 3)], &[&m], &qkv).is_err());
        assert!(call(&[(0, 3)], &[], &qkv).is_err());
        Ok(())
    }
}
