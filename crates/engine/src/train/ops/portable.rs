//! The training ops composed of candle's device-generic ops, each of which has a backward pass
//! in candle's autograd: the GPU's training path (the fused ops beside this file are CPU
//! kernels). On the CPU they run when a decoder is set to its portable path, which is how tests
//! hold them to the fused ops and to torch without a GPU.

use crate::io::config::Activation;
use anyhow::Result;
use candle_core::{Tensor, D};

/// RMSNorm over the last dimension, times `weight` (`1 + weight` for Gemma), as transformers
/// computes it: `x * rsqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, plus_one: bool) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    let w = if plus_one {
        (weight + 1.0)?
    } else {
        weight.clone()
    };
    Ok(y.broadcast_mul(&w)?)
}

/// Rotary embedding on the first `rot_dim` features of `x: [B, H, T, D]` (halves rotated, as
/// transformers' `rotate_half`), `cos`/`sin: [B, T, rot_dim/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot_dim: usize) -> Result<Tensor> {
    let d = x.dim(3)?;
    let half = rot_dim / 2;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    let mut parts = vec![r1, r2];
    if rot_dim < d {
        parts.push(x.narrow(3, rot_dim, d - rot_dim)?);
    }
    Ok(Tensor::cat(&parts, 3)?)
}

/// The gated MLP's activation: `act(gate) * up` of the fused `[N, 2I]` projection.
pub fn gated(gate_up: &Tensor, act: Activation) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, i)?;
    let up = gate_up.narrow(D::Minus1, i, i)?;
    Ok((crate::model::layers::act(act, &gate)? * up)?)
}

/// Causal attention of one sequence, `q: [1, H, T, D]`, `k, v: [1, Hkv, T, D]`, with the
/// additive `[T, T]` mask (values as the fused op takes them): `[1, T, H·D]`, as the fused op.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (_, h, t, d) = q.dims4()?;
    let mask = Tensor::from_slice(mask, (1, 1, t, t), q.device())?;
    let out = crate::kernels::device_ops::attention_with(
        q,
        k,
        v,
        &mask,
        scale,
        softcap,
        crate::kernels::device_ops::Softmax::Differentiable,
    )?;
    Ok(out.transpose(1, 2)?.reshape((1, t, h * d))?)
}

/// Summed negative log-likelihood of `targets` under the logits of `rows: [N, H]` times
/// `weight: [V, H]`ᵀ (Gemma2's final soft-cap applied).
pub fn head_nll(
    rows: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
) -> Result<Tensor> {
    let mut logits = rows.matmul(&weight.t()?)?;
    if let Some(cap) = softcap {
        logits = ((logits / cap)?.tanh()? * cap)?;
    }
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), rows.device())?;
    Ok(logp.gather(&idx, 1)?.sum_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use crate::train::ops::rows::value_and_grad_errs;
    use candle_core::{Device, Var};

    fn var(shape: &[usize], seed: u64) -> Var {
        let n = shape.iter().product();
        Var::from_vec(pseudo(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// Values and every input's gradient of the composed op against the fused one.
    fn check(what: &str, vars: &[&Var], ours: Tensor, fused: Tensor, tol: f32) {
        // A scalar loss is back-propagated from 1 (the fused head op prepares exactly that).
        let coef = match ours.elem_count() {
            1 => ours.ones_like().unwrap(),
            n => Tensor::from_vec(pseudo(n, 99), ours.shape(), &Device::Cpu).unwrap(),
        };
        let vs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (ve, ge, _) = value_and_grad_errs(&ours, &fused, &coef, &vs).unwrap();
        assert!(
            ve < 1e-5 && ge.iter().all(|&e| e < tol),
            "{what}: {ve} {ge:?}"
        );
    }

    #[test]
    fn equal_the_fused_ops() {
        use crate::train::ops as fused;
        let (x, w) = (var(&[6, 16], 1), var(&[16], 2));
        for plus_one in [false, true] {
            let (a, b) = (x.as_tensor(), w.as_tensor());
            let ours = rms_norm(a, b, 1e-6, plus_one).unwrap();
            let theirs = fused::norm::rms_norm(a, b, 1e-6, plus_one).unwrap();
            check("norm", &[&x, &w], ours, theirs, 1e-5);
        }

        let q = var(&[1, 2, 5, 8], 3);
        let c = Tensor::from_vec(pseudo(15, 4), (1, 5, 3), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(pseudo(15, 5), (1, 5, 3), &Device::Cpu).unwrap();
        let ours = rope(q.as_tensor(), &c, &s, 6).unwrap();
        let theirs = fused::rope::rope(q.as_tensor(), &c, &s, 6).unwrap();
        check("rope", &[&q], ours, theirs, 1e-5);

        let gu = var(&[4, 12], 6);
        for a in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
            let ours = gated(gu.as_tensor(), a).unwrap();
            let theirs = fused::act::gated(gu.as_tensor(), a).unwrap();
            check(&format!("{a:?}"), &[&gu], ours, theirs, 1e-4);
        }

        let (h, hkv, t, d) = (4, 2, 6, 8);
        let (q, k, v) = (
            var(&[1, h, t, d], 7),
            var(&[1, hkv, t, d], 8),
            var(&[1, hkv, t, d], 9),
        );
        let layout = crate::model::mask::PadLayout {
            shared: 0,
            past: 0,
            new_tokens: t,
        };
        for (window, cap) in [(None, None), (Some(3), Some(5.0))] {
            let mask = layout.additive_mask(&[0], window);
            let (a, b, c) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let ours = attention(a, b, c, &mask, 0.35, cap).unwrap();
            let theirs = fused::attention::attention(a, b, c, &mask, 0.35, cap).unwrap();
            check("attention", &[&q, &k, &v], ours, theirs, 1e-5);
        }

        let (rows, head) = (var(&[5, 16], 10), var(&[20, 16], 11));
        let targets = [3u32, 0, 19, 7, 7];
        for cap in [None, Some(4.0)] {
            let ours = head_nll(rows.as_tensor(), head.as_tensor(), &targets, cap).unwrap();
            // The fused op's gradients are made in its forward pass (scale 1, no weight sink):
            // its input gradient is compared; the weight's is the sink's, not autograd's.
            let theirs = fused::loss::head_nll(
                rows.as_tensor(),
                head.as_tensor(),
                &targets,
                cap,
                Some(fused::loss::HeadGrads {
                    scale: 1.0,
                    weight: None,
                }),
                crate::kernels::gemm::Precision::F32,
            )
            .unwrap();
            check("head", &[&rows], ours, theirs, 1e-5);
        }
    }
}
