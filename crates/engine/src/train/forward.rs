//! The decoder's training forward pass, on packed rows: a batch's sequences laid end to end
//! (`[N, H]`, N the real tokens) instead of a left-padded `[B, T, H]`. Everything but attention
//! works token by token, so no projection, norm or MLP spends work (and backward work) on
//! padding; attention runs per sequence on views of the packed rows. Every step is a fused op
//! with its own backward pass (train/ops), so candle's autograd records about a dozen nodes per
//! layer.

use crate::io::config::AttentionKind;
use crate::model::layers::Layer;
use crate::model::mask::PadLayout;
use crate::model::Decoder;
use crate::model::RmsNorm;
use crate::train::ops::attention::{attention, attention_block, packed_attention, Heads};
use crate::train::ops::{act::gated, mlp::mlp_block, norm::rms_norm, portable, rope::rope};
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

/// A batch's token rows, packed: each sequence's rows in order, one after another.
pub struct Packed {
    /// `[1, N]` u32.
    pub ids: Tensor,
    /// (first row, length) of each sequence.
    pub seqs: Vec<(usize, usize)>,
    /// cos and sin `[1, N, rot/2]` at each row's position, for full and sliding layers.
    rope_global: (Tensor, Tensor),
    rope_local: Option<(Tensor, Tensor)>,
    /// Additive causal masks `[len, len]` per distinct sequence length: full, and sliding.
    masks: std::collections::HashMap<usize, (Vec<f32>, Option<Vec<f32>>)>,
}

impl Packed {
    pub fn new(dec: &Decoder, rows: &[&[u32]]) -> Result<Packed> {
        if rows.iter().any(|r| r.is_empty()) {
            bail!("a training row is empty");
        }
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let n = ids.len();
        let (mut seqs, mut start) = (Vec::with_capacity(rows.len()), 0);
        for r in rows {
            seqs.push((start, r.len()));
            start += r.len();
        }
        // Positions count from each sequence's first token, as with left padding.
        let positions = vec![rows
            .iter()
            .flat_map(|r| 0..r.len() as u32)
            .collect::<Vec<u32>>()];
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let cfg = &dec.cfg;
        let sliding = cfg.layer_types.contains(&AttentionKind::Sliding);
        let mut masks = std::collections::HashMap::new();
        for &(_, len) in &seqs {
            masks.entry(len).or_insert_with(|| {
                let layout = PadLayout {
                    shared: 0,
                    past: 0,
                    new_tokens: len,
                };
                let window = sliding.then(|| layout.additive_mask(&[0], cfg.sliding_window));
                (layout.additive_mask(&[0], None), window)
            });
        }
        Ok(Packed {
            ids: Tensor::from_vec(ids, (1, n), &dec.device)?,
            seqs,
            rope_global: dec.rope_global.cos_sin(&positions, longest, &dec.device)?,
            rope_local: match &dec.rope_local {
                Some(r) => Some(r.cos_sin(&positions, longest, &dec.device)?),
                None => None,
            },
            masks,
        })
    }

    pub fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.1).sum()
    }
}

/// The decoder's training ops: the fused CPU ops, or on its portable path (always off the
/// CPU) the composed ones.
fn norm(dec: &Decoder, n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    if dec.portable {
        return portable::rms_norm(x, &n.weight, n.eps, n.plus_one);
    }
    rms_norm(x, &n.weight, n.eps, n.plus_one)
}

/// One layer on the packed residual stream `x: [N, H]`.
pub fn layer(dec: &Decoder, l: usize, x: &Tensor, p: &Packed) -> Result<Tensor> {
    let layer = &dec.layers[l];
    let cfg = &dec.cfg;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let sliding = layer.kind == AttentionKind::Sliding;

    let (cos, sin) = match (&p.rope_local, sliding) {
        (Some(local), true) => local,
        _ => &p.rope_global,
    };
    let mask = |len: usize| -> &[f32] {
        let (full, window) = &p.masks[&len];
        match (sliding, window) {
            (true, Some(w)) => w,
            _ => full,
        }
    };
    // Without per-head norms between the projection and the rotation, the attention is one op
    // (`packed_attention`), and without a norm after it, so is the whole block from the input
    // norm to the residual add (`attention_block`) when its projections allow; with them, and
    // on the portable path, it is composed.
    let fused = !dec.portable && layer.attn.q_norm.is_none() && layer.attn.k_norm.is_none();
    let masks: Vec<&[f32]> = p.seqs.iter().map(|&(_, len)| mask(len)).collect();
    let heads = Heads {
        nh,
        nkv,
        hd,
        rot_dim: cfg.rotary_dim,
    };
    let (scale, cap) = (cfg.attn_scale, cfg.attn_softcap);
    let block = if fused && layer.attn_out_norm.is_none() {
        attention_block(
            x,
            &layer.attn_in_norm,
            &layer.attn,
            &p.seqs,
            &masks,
            (cos, sin),
            heads,
            (scale, cap),
        )?
    } else {
        None
    };
    let x = match block {
        Some(y) => y,
        None => {
            let h = norm(dec, &layer.attn_in_norm, x)?;
            let qkv = layer.attn.qkv.forward(&h)?;
            let attn = if fused {
                packed_attention(&qkv, &p.seqs, &masks, cos, sin, heads, scale, cap)?
            } else {
                composed_attention(dec, layer, &qkv, p, (cos, sin), &mask)?
            };
            let mut a = layer.attn.o.forward(&attn)?;
            if let Some(on) = &layer.attn_out_norm {
                a = norm(dec, on, &a)?;
            }
            (x + a)?
        }
    };

    if !dec.portable && layer.mlp_out_norm.is_none() {
        if let Some(y) = mlp_block(&x, &layer.mlp_in_norm, &layer.mlp, cfg.activation)? {
            return Ok(y);
        }
    }
    let h = norm(dec, &layer.mlp_in_norm, &x)?;
    let gu = layer.mlp.gate_up.forward(&h)?;
    let gated = if dec.portable { portable::gated } else { gated };
    let mut m = layer.mlp.down.forward(&gated(&gu, cfg.activation)?)?;
    if let Some(on) = &layer.mlp_out_norm {
        m = norm(dec, on, &m)?;
    }
    Ok((x + m)?)
}

/// The attention block composed of ops: q/k norms, rotation, per-sequence attention.
fn composed_attention<'a>(
    dec: &Decoder,
    layer: &Layer,
    qkv: &Tensor,
    p: &'a Packed,
    (cos, sin): (&Tensor, &Tensor),
    mask: &dyn Fn(usize) -> &'a [f32],
) -> Result<Tensor> {
    let cfg = &dec.cfg;
    let n = p.rows();
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    // [1, heads, N, hd] views of the packed projection.
    let heads = |start: usize, count: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(1, start * hd, count * hd)?
            .reshape((1, n, count, hd))?
            .transpose(1, 2)?)
    };
    let (mut q, mut k, v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
    if let Some(qn) = &layer.attn.q_norm {
        q = norm(dec, qn, &q)?;
    }
    if let Some(kn) = &layer.attn.k_norm {
        k = norm(dec, kn, &k)?;
    }
    let rope = if dec.portable { portable::rope } else { rope };
    let q = rope(&q, cos, sin, cfg.rotary_dim)?;
    let k = rope(&k, cos, sin, cfg.rotary_dim)?;
    let attention = if dec.portable {
        portable::attention
    } else {
        attention
    };
    let mut outs = Vec::with_capacity(p.seqs.len());
    for &(start, len) in &p.seqs {
        let seq = |t: &Tensor| t.narrow(2, start, len);
        outs.push(attention(
            &seq(&q)?,
            &seq(&k)?,
            &seq(&v)?,
            mask(len),
            cfg.attn_scale,
            cfg.attn_softcap,
        )?);
    }
    Ok(Tensor::cat(&outs, 1)?.reshape((n, nh * hd))?)
}

/// Token embeddings of the packed rows, `[N, H]` (scaled for Gemma).
pub fn embed(dec: &Decoder, p: &Packed) -> Result<Tensor> {
    Ok(dec.embed(&p.ids)?.squeeze(0)?)
}

/// The final norm of the packed residual stream.
pub fn final_norm(dec: &Decoder, x: &Tensor) -> Result<Tensor> {
    norm(dec, &dec.final_norm, x)
}

/// The whole pass: final-normed hidden states `[N, H]` of the packed rows. With `track_from`,
/// the residual stream entering that layer (the final norm when it is the layer count) becomes
/// a variable, returned, so backward reaches exactly that far: layers below it record nothing.
pub fn forward(
    dec: &Decoder,
    p: &Packed,
    track_from: Option<usize>,
) -> Result<(Tensor, Option<Var>)> {
    let mut x = embed(dec, p)?;
    let mut bottom = None;
    for l in 0..=dec.num_layers() {
        if Some(l) == track_from {
            let v = Var::from_tensor(&x)?;
            x = v.as_tensor().clone();
            bottom = Some(v);
        }
        if l < dec.num_layers() {
            x = layer(dec, l, &x, p)?;
        }
    }
    Ok((final_norm(dec, &x)?, bottom))
}
