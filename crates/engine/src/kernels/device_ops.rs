//! The decoder's paths off the CPU, made of candle's device-generic ops (CUDA kernels and cuBLAS
//! on a GPU). Also runnable on the CPU, where tests hold them to the CPU kernels.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Which softmax attention uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Softmax {
    /// candle's fused kernel (no backward pass): inference.
    Fused,
    /// Composed of ops with backward passes: training.
    Differentiable,
}

/// Causal attention with grouped key/value heads: `q: [B, H, T, D]`, `k, v: [B, Hkv, S, D]`,
/// `mask: [B, 1, T, S]` additive f32 (0 or -inf), scores scaled by `scale` and soft-capped by
/// `softcap`. Scores and softmax are f32 whatever the activations' dtype (transformers upcasts
/// the softmax too); the products run in the activations' dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    attention_with(q, k, v, mask, scale, softcap, Softmax::Fused)
}

/// `attention` with the softmax chosen.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    softmax: Softmax,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, hkv, s, kd) = k.dims4()?;
    if (kb, kd) != (b, d) || v.dims() != k.dims() || hkv == 0 || h % hkv != 0 {
        bail!(
            "attention: q {:?}, k {:?} and v {:?} disagree (expected [B, H, T, D] and [B, Hkv, \
             S, D] twice, H a multiple of Hkv)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.dims() != [b, 1, t, s] {
        bail!(
            "attention: mask {:?}, expected [{b}, 1, {t}, {s}]",
            mask.dims()
        );
    }
    let g = h / hkv;
    // Each key/value head serves g query heads: repeat it (as transformers' repeat_kv).
    let repeat = |x: &Tensor| -> Result<Tensor> {
        Ok(if g == 1 {
            x.contiguous()?
        } else {
            x.unsqueeze(2)?
                .broadcast_as((b, hkv, g, s, d))?
                .contiguous()?
                .reshape((b, h, s, d))?
        })
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = (q.contiguous()?.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let scores = scores.broadcast_add(mask)?;
    let p = match softmax {
        Softmax::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
        Softmax::Differentiable => candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?,
    };
    Ok(p.to_dtype(v.dtype())?.matmul(&v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use crate::model::mask::PadLayout;
    use candle_core::Device;

    /// The ops path equals the CPU kernel: padding, a window, GQA, soft-cap, a KV prefix.
    #[test]
    fn equals_the_cpu_kernel() {
        let dev = &Device::Cpu;
        let (b, h, hkv, d) = (2, 4, 2, 8);
        for (past, t, window, cap) in [(0, 7, None, None), (3, 2, Some(4), Some(20.0))] {
            let s = past + t;
            let pads = [0, 2];
            let layout = PadLayout {
                shared: 0,
                past,
                new_tokens: t,
            };
            let raw = layout.additive_mask(&pads, window);
            let q = Tensor::from_vec(pseudo(b * h * t * d, 1), (b, h, t, d), dev).unwrap();
            let k = Tensor::from_vec(pseudo(b * hkv * s * d, 2), (b, hkv, s, d), dev).unwrap();
            let v = Tensor::from_vec(pseudo(b * hkv * s * d, 3), (b, hkv, s, d), dev).unwrap();
            let want = crate::kernels::attention::attention(
                &q,
                &k,
                &v,
                &raw,
                0.3,
                cap.map(|c: f64| c as f32),
            )
            .unwrap();
            let mask = Tensor::from_vec(raw, (b, 1, t, s), dev).unwrap();
            let got = attention(&q, &k, &v, &mask, 0.3, cap).unwrap();
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "past {past}, window {window:?}: {err}");
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = &Device::Cpu;
        let q = Tensor::zeros((1, 3, 2, 4), DType::F32, dev).unwrap();
        let k = Tensor::zeros((1, 2, 2, 4), DType::F32, dev).unwrap();
        let m = Tensor::zeros((1, 1, 2, 2), DType::F32, dev).unwrap();
        let e = attention(&q, &k, &k, &m, 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple"), "{e}");
    }
}
