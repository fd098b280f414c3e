//! Training primitives: the decoder with its trainable tensors turned into variables and the
//! frozen ones left as plain tensors (so no gradient is ever computed for them), the token loss,
//! gradient accumulation, exact per-layer gradient checkpointing, clipping and the AdamW step.

use crate::model::params::{Module, ParamInfo};
use crate::model::Decoder;
use crate::train::adamw::{clip_scale, AdamW, AdamWConfig};
use crate::train::forward::{self, Packed};
use crate::train::ops::loss::head_nll;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};

/// One micro-batch: token rows, packed end to end for the forward pass (no padding), and the
/// packed positions whose next token is supervised.
pub struct Batch {
    pub rows: Vec<Vec<u32>>,
    /// Packed row index of each position that predicts a supervised token.
    pub positions: Tensor,
    /// The supervised token at each of those positions.
    pub targets: Vec<u32>,
    pub num_targets: usize,
    /// Real tokens in the batch.
    pub num_tokens: usize,
}

impl Batch {
    /// Builds a batch from token rows; `supervised_from[r]` is the first token index of row `r`
    /// that is a training target (1 trains on every token after the first).
    pub fn new(rows: &[&[u32]], supervised_from: &[usize], device: &Device) -> Result<Batch> {
        if rows.is_empty() || rows.iter().all(|r| r.len() < 2) {
            bail!("a training batch needs at least one row of two tokens");
        }
        if rows.iter().any(|r| r.is_empty()) {
            bail!("a training batch has an empty row");
        }
        let (mut positions, mut targets, mut start) = (vec![], vec![], 0usize);
        for (r, row) in rows.iter().enumerate() {
            for k in supervised_from[r].max(1)..row.len() {
                positions.push((start + k - 1) as u32);
                targets.push(row[k]);
            }
            start += row.len();
        }
        let num_targets = targets.len();
        Ok(Batch {
            rows: rows.iter().map(|r| r.to_vec()).collect(),
            positions: Tensor::from_vec(positions, num_targets, device)?,
            targets,
            num_targets,
            num_tokens: start,
        })
    }

    fn packed(&self, dec: &Decoder) -> Result<Packed> {
        let refs: Vec<&[u32]> = self.rows.iter().map(|r| r.as_slice()).collect();
        Packed::new(dec, &refs)
    }
}

pub struct Trainer {
    pub decoder: Decoder,
    /// Trainable parameters, in the decoder's `params_mut` order.
    pub trainable: Vec<(ParamInfo, Var)>,
    pub frozen: Vec<ParamInfo>,
    pub optimizer: AdamW,
    pub grad_checkpointing: bool,
    grads: Vec<Option<Tensor>>,
}

impl Trainer {
    /// Turns the parameters `freeze` does not select into variables; frozen projections also
    /// get the input-gradient-only matmul.
    pub fn new(
        mut decoder: Decoder,
        freeze: impl Fn(&ParamInfo) -> bool,
        adam: AdamWConfig,
        grad_checkpointing: bool,
    ) -> Result<Trainer> {
        let (mut trainable, mut frozen) = (vec![], vec![]);
        // Training runs in f32: bf16/f16 weights are widened here (frozen ones too, since the
        // backward pass needs f32 inputs); quantized ones fail in `params_mut`.
        for (info, t) in decoder.params_mut()? {
            if freeze(&info) {
                *t = t.to_dtype(candle_core::DType::F32)?;
                frozen.push(info);
            } else {
                let var = Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?;
                *t = var.as_tensor().clone();
                trainable.push((info, var));
            }
        }
        let frozen_linear: std::collections::HashSet<(usize, bool)> = frozen
            .iter()
            .filter(|i| i.name.ends_with("_proj.weight"))
            .filter_map(|i| i.layer.map(|l| (l, i.module == Module::Attn)))
            .collect();
        // A fused projection is frozen only when all of its module is (freezing is per module).
        decoder.set_frozen_linears(|l, m| frozen_linear.contains(&(l, m == Module::Attn)));
        let sizes: Vec<usize> = trainable.iter().map(|(_, v)| v.elem_count()).collect();
        let n = trainable.len();
        Ok(Trainer {
            decoder,
            trainable,
            frozen,
            optimizer: AdamW::new(adam, &sizes),
            grad_checkpointing,
            grads: vec![None; n],
        })
    }

    /// Forward and backward of one micro-batch; its gradients, multiplied by `loss_scale`
    /// (1 / supervised tokens of the whole optimizer step), are added to the accumulated ones.
    /// Returns the summed token loss of the batch.
    pub fn accumulate(&mut self, batch: &Batch, loss_scale: f64) -> Result<f64> {
        if batch.num_targets == 0 {
            return Ok(0.0);
        }
        if self.grad_checkpointing {
            return self.accumulate_checkpointed(batch, loss_scale);
        }
        let nll = self.loss(batch, true)?;
        let value = nll.to_scalar::<f32>()? as f64;
        let mut grads = (nll * loss_scale)?.backward()?;
        self.collect(&mut grads)?;
        Ok(value)
    }

    /// The batch's summed token loss, differentiable; with `grads` the head op prepares the
    /// gradients a backward pass will ask for.
    pub fn loss(&self, batch: &Batch, grads: bool) -> Result<Tensor> {
        let h = forward::forward(&self.decoder, &batch.packed(&self.decoder)?)?;
        self.head_loss(&h, batch, grads)
    }

    /// Summed token loss at the batch's supervised positions; with `grads` the head op also
    /// prepares the gradients backward will ask for.
    fn head_loss(&self, h: &Tensor, batch: &Batch, grads: bool) -> Result<Tensor> {
        let rows = h.index_select(&batch.positions, 0)?;
        let dec = &self.decoder;
        let w = dec.lm_head.as_ref().unwrap_or(&dec.embed).tensor()?;
        let want = (grads, grads && w.is_variable());
        head_nll(&rows, w, &batch.targets, dec.cfg.final_softcap, want)
    }

    /// Keeps only each layer's input; walks back layer by layer, recomputing one layer's
    /// forward at a time and back-propagating the gradient of its output into it.
    fn accumulate_checkpointed(&mut self, batch: &Batch, loss_scale: f64) -> Result<f64> {
        let dec = &self.decoder;
        let packed = batch.packed(dec)?;
        let mut inputs = vec![forward::embed(dec, &packed)?.detach()];
        for l in 0..dec.num_layers() {
            let x = forward::layer(dec, l, &inputs[l], &packed)?;
            inputs.push(x.detach());
        }
        let top = Var::from_tensor(&inputs[dec.num_layers()])?;
        let h = forward::final_norm(dec, top.as_tensor())?;
        let nll = self.head_loss(&h, batch, true)?;
        let value = nll.to_scalar::<f32>()? as f64;
        let mut grads = (nll * loss_scale)?.backward()?;
        let mut upstream = grads
            .remove(top.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the last layer"))?;
        self.collect(&mut grads)?;
        // Below the lowest trainable parameter no gradient is needed (frozen embeddings).
        let embed_trains = self
            .trainable
            .iter()
            .any(|(i, _)| i.module == Module::Embed);
        let lowest = self.trainable.iter().filter_map(|(i, _)| i.layer).min();
        let needed = |l: usize| embed_trains || lowest.is_some_and(|lo| lo <= l);
        for l in (0..self.decoder.num_layers()).rev() {
            if !needed(l) {
                return Ok(value);
            }
            let x = Var::from_tensor(&inputs[l])?;
            let y = forward::layer(&self.decoder, l, x.as_tensor(), &packed)?;
            let mut grads = (y * &upstream)?.sum_all()?.backward()?;
            upstream = grads
                .remove(x.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient reached layer {l}"))?;
            self.collect(&mut grads)?;
        }
        if !embed_trains {
            return Ok(value);
        }
        let mut grads = (forward::embed(&self.decoder, &packed)? * &upstream)?
            .sum_all()?
            .backward()?;
        self.collect(&mut grads)?;
        Ok(value)
    }

    fn collect(&mut self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        for (i, (_, var)) in self.trainable.iter().enumerate() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                add_grad(&mut self.grads[i], g)?;
            }
        }
        Ok(())
    }

    /// The gradients accumulated since the last `apply`, in `trainable` order.
    pub fn gradients(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// Clips, steps the optimizer at `lr` and clears the gradients. Returns the gradient norm
    /// before clipping.
    pub fn apply(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let params: Vec<Tensor> = self
            .trainable
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        let grads: Vec<Option<Tensor>> = self.grads.iter_mut().map(|g| g.take()).collect();
        let (scale, norm) = clip_scale(&grads, max_grad_norm)?;
        self.optimizer.step(&params, &grads, lr, scale)?;
        Ok(norm)
    }

    /// Mean token loss of batches without any gradient (held-out evaluation).
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for b in batches.iter().filter(|b| b.num_targets > 0) {
            sum += self.loss(b, false)?.to_scalar::<f32>()? as f64;
            n += b.num_targets;
        }
        Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
    }
}

fn add_grad(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(acc) => (acc + g)?,
        None => g,
    });
    Ok(())
}
