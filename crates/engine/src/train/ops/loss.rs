//! The language-model head and the token loss in one op: `sum_i -log softmax(h_i · Wᵀ)[t_i]`
//! over the supervised rows, with Gemma2's final soft-cap. The logits are computed a band of rows
//! at a time and never held whole (for SmolLM2 at batch 4 x 128 they would be 100 MB, plus as
//! much again for their softmax in backward). Since the loss is a scalar, its gradients are known
//! by the end of the forward pass: each band's `softmax - onehot` goes straight into `dh` and
//! `dW`, and backward only scales them by the incoming gradient.

use super::{f32_slice, tensor_from};
use crate::kernels::gemm::{matmul, Mat};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows of logits per band: 64 x vocabulary floats (12 MB for a 49K vocabulary) keep the gemm
/// efficient and the band's memory small.
const BAND: usize = 64;

struct HeadLoss {
    targets: Vec<u32>,
    softcap: Option<f32>,
    /// Gradients wanted: (of h, of W).
    want: (bool, bool),
    /// Set by the forward pass: d loss / d h and d loss / d W.
    grads: Mutex<(Option<Vec<f32>>, Option<Vec<f32>>)>,
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((n, hid), (vocab, w_hid)) = (h_l.shape().dims2()?, w_l.shape().dims2()?);
        if hid != w_hid || n != self.targets.len() {
            candle_core::bail!(
                "head-loss: {n} rows of {hid} for {} targets against a [{vocab}, {w_hid}] head",
                self.targets.len()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("head-loss: target token {t} is outside the vocabulary of {vocab}");
        }
        let (h, w) = (f32_slice(h, h_l)?, f32_slice(w, w_l)?);
        let wm = Mat::new(w, vocab, hid);
        let mut dh = self.want.0.then(|| vec![0f32; n * hid]);
        let mut dw = self.want.1.then(|| vec![0f32; vocab * hid]);
        let mut logits = vec![0f32; BAND.min(n) * vocab];
        let mut loss = 0f64;
        for r0 in (0..n).step_by(BAND) {
            let rows = BAND.min(n - r0);
            let band = &mut logits[..rows * vocab];
            let hm = Mat::new(&h[r0 * hid..(r0 + rows) * hid], rows, hid);
            matmul(band, vocab, hm, wm.t(), false, true);
            let grad = dh.is_some() || dw.is_some();
            let targets = &self.targets[r0..r0 + rows];
            loss += band
                .par_chunks_mut(vocab)
                .zip(targets)
                .map(|(row, &t)| row_loss(row, t as usize, self.softcap, grad))
                .sum::<f64>();
            if let Some(dh) = dh.as_mut() {
                let dst = &mut dh[r0 * hid..(r0 + rows) * hid];
                matmul(dst, hid, Mat::new(band, rows, vocab), wm, false, true);
            }
            if let Some(dw) = dw.as_mut() {
                matmul(dw, hid, Mat::new(band, rows, vocab).t(), hm, r0 > 0, true);
            }
        }
        *self.grads.lock().unwrap() = (dh, dw);
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let (dh, dw) = std::mem::take(&mut *self.grads.lock().unwrap());
        let scaled = |v: Option<Vec<f32>>, like: &Tensor| -> candle_core::Result<Option<Tensor>> {
            match v {
                Some(mut v) => {
                    v.par_chunks_mut(1 << 14)
                        .for_each(|c| c.iter_mut().for_each(|x| *x *= g));
                    Ok(Some(tensor_from(v, like.shape().clone(), like)?))
                }
                None => Ok(None),
            }
        };
        Ok((scaled(dh, h)?, scaled(dw, w)?))
    }
}

/// One row's `-log softmax(z)[target]` (z the soft-capped logits); with `grad` the row is
/// overwritten by d loss / d logits (`softmax - onehot`, times the soft-cap's derivative).
fn row_loss(row: &mut [f32], target: usize, softcap: Option<f32>, grad: bool) -> f64 {
    if let Some(cap) = softcap {
        row.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row
        .chunks(1024)
        .map(|c| c.iter().map(|&x| (x - max).exp()).sum::<f32>() as f64)
        .sum();
    let lse = max as f64 + sum.ln();
    let loss = lse - row[target] as f64;
    if grad {
        let lse = lse as f32;
        match softcap {
            None => row.iter_mut().for_each(|x| *x = (*x - lse).exp()),
            Some(cap) => row.iter_mut().for_each(|x| {
                let t = *x / cap;
                *x = (*x - lse).exp() * (1.0 - t * t);
            }),
        }
        let onehot_d = softcap.map_or(1.0, |cap| {
            // The target's own soft-cap derivative, from its capped logit (before overwriting).
            let t = (lse - loss as f32) / cap;
            1.0 - t * t
        });
        row[target] -= onehot_d;
    }
    loss
}

/// Summed token loss of final-normed rows `h: [N, H]` against `targets` (one per row) through
/// the head `weight: [V, H]`. `grads` says which gradients the backward pass will be asked for
/// (none for a held-out evaluation): they are computed during this call.
pub fn head_nll(
    h: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    grads: (bool, bool),
) -> Result<Tensor> {
    if h.dim(0)? != targets.len() {
        bail!(
            "head loss: {} rows for {} targets",
            h.dim(0)?,
            targets.len()
        );
    }
    let op = HeadLoss {
        targets: targets.to_vec(),
        softcap: softcap.map(|c| c as f32),
        want: grads,
        grads: Mutex::new((None, None)),
    };
    Ok(h.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composed reference: sum over rows of `-log softmax(logits)[target]`.
    fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let max = logits.max_keepdim(1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
        let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
        Ok((lse - picked)?.sum_all()?)
    }

    fn check(n: usize, vocab: usize, hid: usize, softcap: Option<f64>) -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (n, hid), &dev)? * 2.0)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (vocab, hid), &dev)?)?;
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % vocab) as u32).collect();
        let t = Tensor::new(targets.as_slice(), &dev)?;
        let mut logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
        if let Some(cap) = softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        let want = nll_sum(&logits, &t)?;
        let got = head_nll(
            h.as_tensor(),
            w.as_tensor(),
            &targets,
            softcap,
            (true, true),
        )?;
        let (a, b) = (want.to_scalar::<f32>()?, got.to_scalar::<f32>()?);
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
        let (gw, gg) = ((want * 0.5)?.backward()?, (got * 0.5)?.backward()?);
        for v in [&h, &w] {
            let (x, y) = (
                gw.get(v.as_tensor()).unwrap(),
                gg.get(v.as_tensor()).unwrap(),
            );
            let err = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = x.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err <= 1e-5 * scale.max(1e-3),
                "gradient error {err} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn loss_and_gradients_equal_the_composed_ops() -> Result<()> {
        check(3, 11, 5, None)?;
        check(130, 257, 33, None)?; // several bands, the last one partial
        check(70, 300, 16, Some(3.0))?; // a small cap saturates tanh
        check(70, 300, 16, Some(30.0))?;
        Ok(())
    }

    #[test]
    fn without_gradients_nothing_is_kept_and_bad_targets_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (10, 8), &dev)?;
        let l = head_nll(&h, &w, &[1, 2, 3, 4], None, (false, false))?;
        assert!(l.to_scalar::<f32>()?.is_finite());
        let err = head_nll(&h, &w, &[1, 2, 3, 10], None, (false, false)).unwrap_err();
        assert!(format!("{err:#}").contains("target token 10"), "{err:#}");
        Ok(())
    }
}
