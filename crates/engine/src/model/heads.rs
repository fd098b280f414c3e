//! One attention head's weights as views of the fused projections: the decoder keeps q/k/v
//! stacked in one `[q_dim + 2 kv_dim, H]` matrix, so a researcher asking for `W_Q[h]` gets rows of
//! it rather than a copy.

use crate::model::Decoder;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Head `head` of layer `layer`, in the checkpoint's `[out, in]` layout. Under grouped-query
/// attention `k` and `v` are those of the key/value head the query head reads (`kv_head`).
#[derive(Debug, Clone)]
pub struct HeadWeights {
    /// `W_Q[h]`: `[head_dim, hidden]`, rows `h*hd..(h+1)*hd` of `q_proj`.
    pub q: Tensor,
    /// `W_K` of the head's key/value group: `[head_dim, hidden]`.
    pub k: Tensor,
    /// `W_V` of the head's key/value group: `[head_dim, hidden]`.
    pub v: Tensor,
    /// `W_O[:, h*hd..(h+1)*hd]`: `[hidden, head_dim]`, the columns of `o_proj` that read the
    /// head's output.
    pub o: Tensor,
    /// The key/value head this query head shares (`head / (num_heads / num_kv_heads)`).
    pub kv_head: usize,
}

impl Decoder {
    /// Narrow views of the fused q/k/v and o weights for one attention head.
    pub fn head_weights(&self, layer: usize, head: usize) -> Result<HeadWeights> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if layer >= self.layers.len() {
            bail!(
                "layer {layer} is outside the model (0..{})",
                self.layers.len()
            );
        }
        if head >= nh {
            bail!("head {head} is outside layer {layer} (num_attention_heads = {nh})");
        }
        let kv_head = head / (nh / nkv);
        let attn = &self.layers[layer].attn;
        let qkv = &attn.qkv.weight.to_f32()?;
        Ok(HeadWeights {
            q: qkv.narrow(0, head * hd, hd)?,
            k: qkv.narrow(0, (nh + kv_head) * hd, hd)?,
            v: qkv.narrow(0, (nh + nkv + kv_head) * hd, hd)?,
            o: attn.o.weight.to_f32()?.narrow(1, head * hd, hd)?,
            kv_head,
        })
    }
}
