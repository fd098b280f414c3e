//! The language-model head and the token loss in one op: `sum_i -log softmax(h_i · Wᵀ)[t_i]`
//! over the supervised rows, with Gemma2's final soft-cap. The logits are computed a band of rows
//! at a time and never held whole (for SmolLM2 at batch 4 x 128 they would be 100 MB, plus as
//! much again for their softmax in backward). Since the loss is a scalar, its gradients are known
//! by the end of the forward pass: each band's `softmax - onehot`, times the loss's scale in the
//! step (known in advance: 1 / the step's supervised tokens), goes straight into `dh` and into
//! the head's gradient buffer; backward checks the scale and hands `dh` on.

use super::act::exp;
use super::f32_slice;
use crate::kernels::gemm::{matmul_rhs, Mat, Precision, Rhs};
use crate::train::sink::GradSink;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// What the backward pass of a head loss will need.
#[derive(Clone)]
pub struct HeadGrads {
    /// The gradient backward will bring (the loss's multiplier in the step).
    pub scale: f64,
    /// The head weight's gradient buffer, when it trains.
    pub weight: Option<Arc<GradSink>>,
}

/// Rows of logits per band: 64 x vocabulary floats (12 MB for a 49K vocabulary) keep the gemm
/// efficient and the band's memory small.
const BAND: usize = 64;

struct HeadLoss {
    targets: Vec<u32>,
    precision: Precision,
    softcap: Option<f32>,
    grads: Option<HeadGrads>,
    /// Set by the forward pass: d loss / d h, times the scale.
    dh: Mutex<Option<Vec<f32>>>,
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
        // The head is the same for every band: prepared (packed, for bf16) once.
        let wt_rhs = Rhs::new(self.precision, wm.t());
        let w_rhs = self.grads.is_some().then(|| Rhs::new(self.precision, wm));
        let scale = self.grads.as_ref().map(|g| g.scale as f32);
        let sink = self.grads.as_ref().and_then(|g| g.weight.as_ref());
        let mut dh = scale.map(|_| vec![0f32; n * hid]);
        let mut logits = vec![0f32; BAND.min(n) * vocab];
        let mut loss = 0f64;
        for r0 in (0..n).step_by(BAND) {
            let rows = BAND.min(n - r0);
            let band = &mut logits[..rows * vocab];
            let h_band = &h[r0 * hid..(r0 + rows) * hid];
            matmul_rhs(
                band,
                vocab,
                Mat::new(h_band, rows, hid),
                &wt_rhs,
                false,
                true,
            );
            let targets = &self.targets[r0..r0 + rows];
            loss += band
                .par_chunks_mut(vocab)
                .zip(targets)
                .map(|(row, &t)| row_loss(row, t as usize, self.softcap, scale))
                .sum::<f64>();
            if let (Some(dh), Some(w_rhs)) = (dh.as_mut(), &w_rhs) {
                let dst = &mut dh[r0 * hid..(r0 + rows) * hid];
                matmul_rhs(dst, hid, Mat::new(band, rows, vocab), w_rhs, false, true);
            }
            if let Some(sink) = sink {
                sink.add_at_b(band, h_band, rows, true, self.precision)
                    .map_err(|e| candle_core::Error::Msg(format!("head loss: {e:#}")))?;
            }
        }
        *self.dh.lock().unwrap() = dh;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _w: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
        let Some(scale) = self.grads.as_ref().map(|g| g.scale) else {
            candle_core::bail!("head loss: backward through a loss computed without gradients")
        };
        if (g - scale).abs() > 1e-6 * scale.abs() {
            candle_core::bail!("head loss: backward brings {g}, the forward prepared for {scale}");
        }
        let dh = self.dh.lock().unwrap().take();
        let Some(dh) = dh else {
            candle_core::bail!("head loss: a second backward through the same loss")
        };
        Ok((Some(Tensor::from_vec(dh, h.shape(), h.device())?), None))
    }
}

/// One row's `-log softmax(z)[target]` (z the soft-capped logits); with `grad` (a scale) the
/// row is overwritten by scale · d loss / d logits (`softmax - onehot`, times the soft-cap's
/// derivative).
fn row_loss(row: &mut [f32], target: usize, softcap: Option<f32>, grad: Option<f32>) -> f64 {
    if let Some(cap) = softcap {
        row.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row
        .chunks(1024)
        .map(|c| c.iter().map(|&x| exp(x - max)).sum::<f32>() as f64)
        .sum();
    let lse = max as f64 + sum.ln();
    let loss = lse - row[target] as f64;
    if let Some(scale) = grad {
        let lse = lse as f32;
        match softcap {
            None => row.iter_mut().for_each(|x| *x = exp(*x - lse)),
            Some(cap) => row.iter_mut().for_each(|x| {
                let t = *x / cap;
                *x = exp(*x - lse) * (1.0 - t * t);
            }),
        }
        let onehot_d = softcap.map_or(1.0, |cap| {
            // The target's own soft-cap derivative, from its capped logit (before overwriting).
            let t = (lse - loss as f32) / cap;
            1.0 - t * t
        });
        row[target] -= onehot_d;
        if scale != 1.0 {
            row.iter_mut().for_each(|x| *x *= scale);
        }
    }
    loss
}

/// Summed token loss of final-normed rows `h: [N, H]` against `targets` (one per row) through
/// the head `weight: [V, H]`. With `grads` the gradients are made during this call: the head
/// weight's added into its buffer, the rows' kept for the backward pass. The logits and both
/// gradients' products are computed in `precision`.
pub fn head_nll(
    h: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    grads: Option<HeadGrads>,
    precision: Precision,
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
        precision,
        softcap: softcap.map(|c| c as f32),
        grads,
        dh: Mutex::new(None),
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
        let sink = Arc::new(GradSink::new(vocab, hid));
        let grads = HeadGrads {
            scale: 0.5,
            weight: Some(sink.clone()),
        };
        let plain_w = w.as_tensor().detach();
        let got = head_nll(
            h.as_tensor(),
            &plain_w,
            &targets,
            softcap,
            Some(grads),
            Precision::F32,
        )?;
        let (a, b) = (want.to_scalar::<f32>()?, got.to_scalar::<f32>()?);
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
        let (gw, gg) = ((want * 0.5)?.backward()?, (got * 0.5)?.backward()?);
        let close = |x: &Tensor, y: &Tensor| -> Result<()> {
            let err = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = x.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err <= 1e-5 * scale.max(1e-3),
                "gradient error {err} (scale {scale})"
            );
            Ok(())
        };
        close(gw.get(&h).unwrap(), gg.get(&h).unwrap())?;
        close(gw.get(&w).unwrap(), &sink.to_tensor()?.unwrap())?;
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
    fn bad_targets_scales_and_a_loss_without_gradients_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (10, 8), &dev)?;
        let l = head_nll(h.as_tensor(), &w, &[1, 2, 3, 4], None, None, Precision::F32)?;
        assert!(l.to_scalar::<f32>()?.is_finite());
        let err = l.backward().unwrap_err();
        assert!(format!("{err:#}").contains("without gradients"), "{err:#}");
        let err = head_nll(
            h.as_tensor(),
            &w,
            &[1, 2, 3, 10],
            None,
            None,
            Precision::F32,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("target token 10"), "{err:#}");
        let grads = HeadGrads {
            scale: 0.25,
            weight: None,
        };
        let l = head_nll(
            h.as_tensor(),
            &w,
            &[1, 2, 3, 4],
            None,
            Some(grads),
            Precision::F32,
        )?;
        let err = (l * 0.5)?.backward().unwrap_err();
        assert!(format!("{err:#}").contains("prepared for 0.25"), "{err:#}");
        Ok(())
    }
}
