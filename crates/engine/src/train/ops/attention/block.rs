//! A layer's whole attention block as one op: `y = x + o(attention(qkv(rmsnorm(x))))`, the
//! attention that of [`super::packed_attention`] (rope inside, each packed sequence on its own).
//! As for the MLP block (`ops::mlp`), candle then tracks the block's input and norm weight only:
//! the normed rows, the projection, the heads' outputs and the residual add get no zeroed
//! gradient buffer and no add into it of their own.

use super::packed::{Heads, PackedAttention};
use crate::model::layers::Attention;
use crate::model::RmsNorm;
use crate::train::ops::block::{add_into, PreNorm, Proj};
use crate::train::ops::{cpu_f32, f32_slice};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::sync::Mutex;

/// What the forward pass keeps for backward (the input itself candle keeps; the attention op
/// keeps its own).
struct Saved {
    /// The normed input `[N, H]` and its rows' 1/rms, the projection `[N, W]`, the heads'
    /// outputs `[N, NH · D]`.
    h: Vec<f32>,
    inv: Vec<f32>,
    qkv: Vec<f32>,
    heads: Vec<f32>,
}

struct AttentionBlock {
    norm: PreNorm,
    qkv: Proj,
    o: Proj,
    attention: PackedAttention,
    saved: Mutex<Option<Saved>>,
}

impl CustomOp2 for AttentionBlock {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, hid) = xl.shape().dims2()?;
        let (w, qkv_in) = self.qkv.dims()?;
        let (o_out, o_in) = self.o.dims()?;
        if qkv_in != hid || o_out != hid || wl.dims() != [hid] {
            candle_core::bail!(
                "attention block: input [{n}, {hid}], norm {:?}, qkv [{w}, {qkv_in}], o \
                 [{o_out}, {o_in}]",
                wl.dims()
            );
        }
        let (x, nw) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let (h, inv) = self.norm.forward(x, nw, n, hid);
        let qkv = self.qkv.forward(&h, n)?;
        let heads = self.attention.forward(&qkv, w, n)?;
        if heads.len() != n * o_in {
            candle_core::bail!(
                "attention block: heads of {} values for o [{o_out}, {o_in}]",
                heads.len()
            );
        }
        let mut y = self.o.forward(&heads, n)?;
        add_into(&mut y, x);
        *self.saved.lock().unwrap() = Some(Saved { h, inv, qkv, heads });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().unwrap();
        let saved = guard.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("attention block: backward before forward".into())
        })?;
        let n = x.dims2()?.0;
        let width = self.qkv.dims()?.0;
        let dy = dy.contiguous()?;
        let (dy_s, dy_l) = dy.storage_and_layout();
        let dy = cpu_f32(&dy_s, dy_l)?;
        let d_heads = self.o.backward(dy, &saved.heads, n)?;
        let d_qkv = self.attention.backward(&saved.qkv, width, n, &d_heads)?;
        drop(d_heads);
        let dh = self.qkv.backward(&d_qkv, &saved.h, n)?;
        drop(d_qkv);
        self.norm.backward(x, w, &dh, dy, &saved.inv)
    }
}

/// `x + o(attention(qkv(norm(x))))` for the packed rows `x: [N, H]` as one op, the attention
/// over `seqs` as [`super::packed_attention`] computes it (same arguments); `None` when a
/// projection is not one the op runs (biased, scaled, not f32: the caller composes the block
/// then).
#[allow(clippy::too_many_arguments)]
pub fn attention_block(
    x: &Tensor,
    norm: &RmsNorm,
    attn: &Attention,
    seqs: &[(usize, usize)],
    masks: &[&[f32]],
    (cos, sin): (&Tensor, &Tensor),
    heads: Heads,
    (scale, softcap): (f64, Option<f64>),
) -> Result<Option<Tensor>> {
    let (Some(qkv), Some(o)) = (Proj::of(&attn.qkv), Proj::of(&attn.o)) else {
        return Ok(None);
    };
    let op = AttentionBlock {
        norm: PreNorm::of(norm),
        qkv,
        o,
        attention: PackedAttention::new(seqs, masks, cos, sin, heads, scale, softcap)?,
        saved: Mutex::new(None),
    };
    Ok(Some(
        x.contiguous()?.apply_op2(&norm.weight.contiguous()?, op)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Attention;
    use crate::train::ops::attention::packed::tests::packed_setup;
    use crate::train::ops::attention::packed_attention;
    use crate::train::ops::block::tests::{linear, randn, sink};
    use crate::train::ops::norm::rms_norm;
    use crate::train::ops::rows::rel_err;
    use candle_core::{Device, Var};

    /// The block against the separate ops (norm, linear, packed attention, linear, add): values,
    /// the input's and the norm weight's gradients, both projections' sinks.
    fn check(h: Heads, lens: &[usize], window: Option<usize>, trains: bool) -> Result<()> {
        let (n, hid) = (lens.iter().sum::<usize>(), 24);
        let w = (h.nh + 2 * h.nkv) * h.hd;
        let x = Var::from_tensor(&randn((n, hid), 1)?)?;
        let w_norm = Var::from_tensor(&randn((1, hid), 2)?.squeeze(0)?.affine(0.2, 1.0)?)?;
        let (w_qkv, w_o) = (randn((w, hid), 3)?, randn((hid, h.nh * h.hd), 4)?);
        let (cos, sin, seqs, owned) = packed_setup(h, lens, window)?;
        let masks: Vec<&[f32]> = owned.iter().map(|m| m.as_slice()).collect();
        let (scale, cap) = (0.35, Some(3.0));
        let coef = randn((n, hid), 5)?;
        let mut results = Vec::new();
        for fused in [false, true] {
            let norm = RmsNorm::new(w_norm.as_tensor().clone(), false, 1e-6)?;
            let attn = Attention {
                qkv: linear(&w_qkv, trains),
                o: linear(&w_o, trains),
                q_norm: None,
                k_norm: None,
            };
            let y = if fused {
                let (rope, caps) = ((&cos, &sin), (scale, cap));
                attention_block(x.as_tensor(), &norm, &attn, &seqs, &masks, rope, h, caps)?
                    .expect("the block fuses")
            } else {
                let hn = rms_norm(x.as_tensor(), &norm.weight, norm.eps, false)?;
                let qkv = attn.qkv.forward(&hn)?;
                let a = packed_attention(&qkv, &seqs, &masks, &cos, &sin, h, scale, cap)?;
                (x.as_tensor() + attn.o.forward(&a)?)?
            };
            let grads = (&y * &coef)?.sum_all()?.backward()?;
            let (dx, dw) = (grads.get(x.as_tensor()), grads.get(w_norm.as_tensor()));
            let (dx, dw) = (dx.unwrap().clone(), dw.unwrap().clone());
            results.push([Some(y), Some(dx), Some(dw), sink(&attn.qkv), sink(&attn.o)]);
        }
        for (i, (got, want)) in results[1].iter().zip(&results[0]).enumerate() {
            match (got, want) {
                (Some(g), Some(w)) => assert!(rel_err(g, w)? < 1e-5, "{lens:?}: result {i}"),
                (None, None) => assert!(!trains && i >= 3),
                _ => panic!("{lens:?}: result {i} present on one side only"),
            }
        }
        Ok(())
    }

    #[test]
    fn equals_the_separate_ops() -> Result<()> {
        let gqa = Heads {
            nh: 4,
            nkv: 2,
            hd: 8,
            rot_dim: 8,
        };
        check(gqa, &[5, 9, 1, 7], None, true)?;
        let partial = Heads {
            nh: 3,
            nkv: 1,
            hd: 10,
            rot_dim: 6,
        };
        check(partial, &[6, 11], Some(4), true)?;
        check(gqa, &[13], None, false)
    }

    #[test]
    fn a_biased_projection_is_left_to_the_caller() -> Result<()> {
        let h = Heads {
            nh: 2,
            nkv: 1,
            hd: 4,
            rot_dim: 4,
        };
        let (cos, sin, seqs, owned) = packed_setup(h, &[3], None)?;
        let masks: Vec<&[f32]> = owned.iter().map(|m| m.as_slice()).collect();
        let mut qkv = linear(&randn((16, 8), 1)?, true);
        qkv.bias = Some(Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu)?);
        let attn = Attention {
            qkv,
            o: linear(&randn((8, 8), 2)?, true),
            q_norm: None,
            k_norm: None,
        };
        let norm = RmsNorm::new(
            Tensor::ones(8, candle_core::DType::F32, &Device::Cpu)?,
            false,
            1e-6,
        )?;
        let x = randn((3, 8), 3)?;
        let got = attention_block(
            &x,
            &norm,
            &attn,
            &seqs,
            &masks,
            (&cos, &sin),
            h,
            (0.5, None),
        )?;
        assert!(got.is_none());
        Ok(())
    }
}
