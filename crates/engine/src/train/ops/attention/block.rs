//! A layer's whole attention block as one op: `y = x + o(attention(qkv(rmsnorm(x))))`, the
//! attention that of [`super::packed_attention`] (rope inside, each packed sequence on its own).
//! As for the MLP block (`ops::mlp`), candle then tracks the block's input and norm weight only:
//! the normed rows, the projection, the heads' outputs and the residual add get no zeroed
//! gradient buffer and no add into it of their own.

use super::packed::{Heads, PackedAttention};
use crate::model::layers::Attention;
use crate::model::RmsNorm;
use crate::train::ops::block::{block, Half, Proj};
use anyhow::Result;
use candle_core::Tensor;

struct AttentionHalf {
    qkv: Proj,
    o: Proj,
    /// Keeps its own saved values (rotated q and k, the softmax statistics).
    attention: PackedAttention,
}

impl Half for AttentionHalf {
    /// The projection `[N, W]` and the heads' outputs `[N, NH · D]`.
    type Saved = (Vec<f32>, Vec<f32>);
    const NAME: &'static str = "attention-block";

    fn check(&self, hid: usize) -> candle_core::Result<()> {
        let ((w, qkv_in), (o_out, o_in)) = (self.qkv.dims()?, self.o.dims()?);
        let heads = self.attention.heads();
        if qkv_in != hid || o_out != hid || o_in != heads.nh * heads.hd {
            candle_core::bail!(
                "attention block: rows of {hid}, qkv [{w}, {qkv_in}], o [{o_out}, {o_in}]"
            );
        }
        Ok(())
    }

    fn forward(&self, h: &[f32], n: usize) -> candle_core::Result<(Vec<f32>, Self::Saved)> {
        let w = self.qkv.dims()?.0;
        let qkv = self.qkv.forward(h, n)?;
        let heads = self.attention.forward(&qkv, w, n)?;
        Ok((self.o.forward(&heads, n)?, (qkv, heads)))
    }

    fn backward(
        &self,
        (qkv, heads): &Self::Saved,
        h: &[f32],
        dy: &[f32],
        n: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let w = self.qkv.dims()?.0;
        let d_heads = self.o.backward(dy, heads, n)?;
        let d_qkv = self.attention.backward(qkv, w, n, &d_heads)?;
        drop(d_heads);
        self.qkv.backward(&d_qkv, h, n)
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
    let attention = PackedAttention::new(seqs, masks, cos, sin, heads, scale, softcap)?;
    Ok(Some(block(x, norm, AttentionHalf { qkv, o, attention })?))
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
