//! Training primitives: the decoder with its trainable vectors turned into variables, its
//! trainable matrices given gradient buffers and its frozen tensors left alone (so no gradient
//! is ever computed for them), the token loss, gradient accumulation, exact per-layer gradient
//! checkpointing, clipping and the AdamW step.

use crate::kernels::gemm::Precision;
use crate::model::layout::Slot;
use crate::model::params::{Module, ParamInfo};
use crate::model::{Decoder, LinearGrad};
use crate::train::adamw::{clip_scale, clip_scale_tensors, AdamW, AdamWConfig};
use crate::train::forward::{self, Packed};
use crate::train::ops::loss::{head_nll, HeadGrads};
use crate::train::ops::portable;
use crate::train::param::Param;
use crate::train::sink::GradSink;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::Arc;

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
    pub trainable: Vec<(ParamInfo, Param)>,
    pub frozen: Vec<ParamInfo>,
    pub optimizer: AdamW,
    pub grad_checkpointing: bool,
    /// Accumulated gradients of the variables (`trainable` order; None for matrices, whose
    /// gradients are in their sinks).
    grads: Vec<Option<Tensor>>,
    /// The embedding's gradient buffer, when it trains.
    embed_sink: Option<Arc<GradSink>>,
    /// The output head's gradient buffer, when it trains (the embedding's when tied).
    head_sink: Option<Arc<GradSink>>,
    /// The first layer whose input needs a gradient: 0 when the embedding trains, else the
    /// lowest layer with a trainable parameter. Nothing below it is recorded for backward.
    track_from: usize,
    /// The decoder's portable path (always off the CPU): every trainable tensor a variable,
    /// candle's autograd and composed ops, AdamW in tensor ops on the parameters' device.
    portable: bool,
    /// The arithmetic of the projections' and head's products (`set_precision`).
    precision: Precision,
}

impl Trainer {
    /// Makes the parameters `freeze` does not select trainable; frozen projections get the
    /// input-gradient-only matmul.
    pub fn new(
        mut decoder: Decoder,
        freeze: impl Fn(&ParamInfo) -> bool,
        adam: AdamWConfig,
        grad_checkpointing: bool,
    ) -> Result<Trainer> {
        let portable = decoder.portable || !decoder.device.is_cpu();
        decoder.use_portable_ops(portable);
        let (mut trainable, mut frozen) = (vec![], vec![]);
        // Training runs in f32: bf16/f16 weights are widened here (frozen ones too, since the
        // backward pass needs f32 inputs); quantized ones fail in `params_mut`.
        for (info, t) in decoder.params_mut()? {
            let t32 = t.to_dtype(DType::F32)?;
            if freeze(&info) {
                *t = t32;
                frozen.push(info);
                continue;
            }
            let matrix =
                info.matrix.is_some() || matches!(info.module, Module::Embed | Module::LmHead);
            let p = if matrix && !portable {
                Param::matrix(&t32)?
            } else {
                Param::var(&t32)?
            };
            *t = p.as_tensor().clone();
            trainable.push((info, p));
        }
        let sink_of = |pred: &dyn Fn(&ParamInfo) -> bool| {
            trainable
                .iter()
                .find(|(i, _)| pred(i))
                .and_then(|(_, p): &(ParamInfo, Param)| p.sink().cloned())
        };
        let layer_sinks: HashMap<(usize, Slot), Arc<GradSink>> = trainable
            .iter()
            .filter_map(|(i, p)| Some(((i.layer?, i.matrix?), p.sink()?.clone())))
            .collect();
        decoder.set_linear_grads(|l, slot| match layer_sinks.get(&(l, slot)) {
            _ if portable => LinearGrad::Autograd,
            Some(s) => LinearGrad::Sink(s.clone()),
            None => LinearGrad::Frozen,
        });
        let embed_sink = sink_of(&|i| i.module == Module::Embed);
        let head_sink = match decoder.lm_head {
            Some(_) => sink_of(&|i| i.module == Module::LmHead),
            None => embed_sink.clone(),
        };
        let track_from = if embed_sink.is_some() {
            0
        } else {
            let lowest = trainable.iter().filter_map(|(i, _)| i.layer).min();
            lowest.unwrap_or(decoder.num_layers())
        };
        let sizes: Vec<usize> = trainable.iter().map(|(_, v)| v.elem_count()).collect();
        let n = trainable.len();
        Ok(Trainer {
            decoder,
            trainable,
            frozen,
            optimizer: AdamW::new(adam, &sizes),
            grad_checkpointing,
            grads: vec![None; n],
            embed_sink,
            head_sink,
            track_from,
            portable,
            precision: Precision::F32,
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
        let packed = batch.packed(&self.decoder)?;
        // The portable path's autograd records only what depends on a variable.
        let track = (!self.portable).then_some(self.track_from);
        let (h, bottom) = forward::forward(&self.decoder, &packed, track)?;
        let nll = self.head_loss(&h, batch, Some(loss_scale))?;
        let value = nll.to_scalar::<f32>()? as f64;
        let mut grads = (nll * loss_scale)?.backward()?;
        // With a trainable embedding the stream is tracked from the bottom (`track_from` 0).
        if let Some(g) = bottom.and_then(|b| grads.remove(b.as_tensor())) {
            self.embed_backward(&packed, &g)?;
        }
        self.collect(&mut grads)?;
        Ok(value)
    }

    /// The batch's summed token loss (no gradient is prepared: a held-out evaluation, or a
    /// timing probe).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let packed = batch.packed(&self.decoder)?;
        let (h, _) = forward::forward(&self.decoder, &packed, None)?;
        self.head_loss(&h, batch, None)
    }

    /// Summed token loss at the batch's supervised positions; with `scale` (the loss's
    /// multiplier in the step) the head op also prepares the gradients backward will ask for.
    fn head_loss(&self, h: &Tensor, batch: &Batch, scale: Option<f64>) -> Result<Tensor> {
        let rows = h.index_select(&batch.positions.to_device(h.device())?, 0)?;
        let dec = &self.decoder;
        let w = dec.lm_head.as_ref().unwrap_or(&dec.embed).tensor()?;
        if self.portable {
            let targets = &batch.targets;
            return portable::head_nll(&rows, w, targets, dec.cfg.final_softcap);
        }
        let grads = scale.map(|scale| HeadGrads {
            scale,
            weight: self.head_sink.clone(),
        });
        let cap = dec.cfg.final_softcap;
        head_nll(&rows, w, &batch.targets, cap, grads, self.precision)
    }

    /// bf16 mixed precision (`Precision::Bf16`): every projection's and the head's products
    /// with both operands rounded to bf16 and sums in f32, as torch's bf16 autocast computes a
    /// linear layer; the weights, their gradients and AdamW's moments stay f32, as do norms,
    /// attention and the loss. On AMX tiles where the CPU has them.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if self.portable && precision != Precision::F32 {
            bail!(
                "bf16 mixed precision runs on the CPU path; on a GPU hold the model in bf16 \
                 (--dtype bf16) instead"
            );
        }
        self.precision = precision;
        self.decoder.set_train_precision(precision);
        Ok(())
    }

    /// The embedding lookup's backward: each packed row's gradient (that of the stream entering
    /// layer 0) into its token's row. Nothing without a trainable embedding.
    fn embed_backward(&self, packed: &Packed, grad: &Tensor) -> Result<()> {
        let Some(sink) = &self.embed_sink else {
            return Ok(());
        };
        let ids = packed.ids.flatten_all()?.to_vec1::<u32>()?;
        let scale = self.decoder.cfg.embed_scale.map_or(1.0, |s| s as f32);
        let grad = grad.contiguous()?;
        let (g, l) = grad.storage_and_layout();
        sink.add_rows(&ids, crate::train::ops::cpu_f32(&g, l)?, scale)
    }

    /// Keeps only each layer's input; walks back layer by layer, recomputing one layer's
    /// forward at a time and back-propagating the gradient of its output into it.
    fn accumulate_checkpointed(&mut self, batch: &Batch, loss_scale: f64) -> Result<f64> {
        let dec = &self.decoder;
        let packed = batch.packed(dec)?;
        let mut inputs = vec![forward::embed(dec, &packed)?];
        for l in 0..dec.num_layers() {
            let x = forward::layer(dec, l, &inputs[l], &packed)?;
            inputs.push(x.detach());
        }
        let top = Var::from_tensor(&inputs[dec.num_layers()])?;
        let h = forward::final_norm(dec, top.as_tensor())?;
        let nll = self.head_loss(&h, batch, Some(loss_scale))?;
        let value = nll.to_scalar::<f32>()? as f64;
        let mut grads = (nll * loss_scale)?.backward()?;
        let mut upstream = grads
            .remove(top.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the last layer"))?;
        self.collect(&mut grads)?;
        // Below `track_from` nothing needs a gradient.
        for l in (self.track_from..self.decoder.num_layers()).rev() {
            let x = Var::from_tensor(&inputs[l])?;
            let y = forward::layer(&self.decoder, l, x.as_tensor(), &packed)?;
            let mut grads = (y * &upstream)?.sum_all()?.backward()?;
            upstream = grads
                .remove(x.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient reached layer {l}"))?;
            self.collect(&mut grads)?;
        }
        if self.portable && self.track_from == 0 {
            // The embedding is a variable: back-propagate into its lookup.
            let e = forward::embed(&self.decoder, &packed)?;
            let mut grads = (e * &upstream)?.sum_all()?.backward()?;
            self.collect(&mut grads)?;
        }
        self.embed_backward(&packed, &upstream)?;
        Ok(value)
    }

    fn collect(&mut self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        for (i, (_, p)) in self.trainable.iter().enumerate() {
            if let Some(g) = p.as_var().and_then(|v| grads.remove(v.as_tensor())) {
                add_grad(&mut self.grads[i], g)?;
            }
        }
        Ok(())
    }

    /// The gradients accumulated since the last `apply`, in `trainable` order (copies; for
    /// tests and inspection).
    pub fn gradients(&self) -> Result<Vec<Option<Tensor>>> {
        self.trainable
            .iter()
            .zip(&self.grads)
            .map(|((_, p), g)| match p.sink() {
                Some(s) => s.to_tensor(),
                None => Ok(g.clone()),
            })
            .collect()
    }

    /// Clips, steps the optimizer at `lr` and clears the gradients. Returns the gradient norm
    /// before clipping.
    pub fn apply(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        if self.portable {
            let grads: Vec<Option<Tensor>> = self.grads.iter_mut().map(|g| g.take()).collect();
            let (scale, norm) = clip_scale_tensors(&grads, max_grad_norm)?;
            let vars: Vec<&Var> = self
                .trainable
                .iter()
                .map(|(_, p)| {
                    p.as_var()
                        .expect("the portable path's parameters are variables")
                })
                .collect();
            self.optimizer.step_tensors(&vars, &grads, lr, scale)?;
            return Ok(norm);
        }
        let params: Vec<Tensor> = self
            .trainable
            .iter()
            .map(|(_, p)| p.as_tensor().clone())
            .collect();
        let var_grads: Vec<Option<Tensor>> = self
            .grads
            .iter_mut()
            .map(|g| g.take().map(|g| g.contiguous()).transpose())
            .collect::<candle_core::Result<_>>()?;
        // Every gradient's values in place: the variables' storages and the sinks' buffers.
        let storages: Vec<_> = var_grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.storage_and_layout()))
            .collect();
        let sinks: Vec<_> = self
            .trainable
            .iter()
            .map(|(_, p)| p.sink().map(|s| s.lock()))
            .collect();
        let mut slices: Vec<Option<&[f32]>> = Vec::with_capacity(params.len());
        for (st, sk) in storages.iter().zip(&sinks) {
            slices.push(match (st, sk) {
                (Some((s, l)), _) => Some(crate::train::ops::cpu_f32(s, l)?),
                (None, Some(guard)) => guard.values(),
                (None, None) => None,
            });
        }
        let (scale, norm) = clip_scale(&slices, max_grad_norm);
        self.optimizer.step(&params, &slices, lr, scale)?;
        drop(slices);
        drop(sinks);
        for (_, p) in &self.trainable {
            if let Some(s) = p.sink() {
                s.clear();
            }
        }
        Ok(norm)
    }

    /// Mean token loss of batches without any gradient (held-out evaluation).
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for b in batches.iter().filter(|b| b.num_targets > 0) {
            sum += self.loss(b)?.to_scalar::<f32>()? as f64;
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
