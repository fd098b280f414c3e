//! One decoder for every supported family; the config's switches decide norms, biases, rope,
//! windows and soft-caps. q/k/v and gate/up are held fused (as Phi-3 stores them) so that each
//! block does two large matmuls instead of five small ones.

use crate::io::config::{AttentionKind, ModelConfig};
use crate::io::weights::WeightMap;
use crate::model::cache::join_positions;
use crate::model::hooks::{ActivationCache, Hook, HookSpec};
use crate::model::layers::{act, Attention, Layer, Linear, Mlp, RmsNorm};
use crate::model::layout::{Layout, Part, Slot, TopTensor};
use crate::model::rope::{self, Rope};
use crate::model::weight::{Block, Weight};
use crate::model::{KvCache, StepCtx};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

pub struct Decoder {
    pub cfg: ModelConfig,
    /// In its storage precision (rows are widened to f32 as they are looked up).
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub final_norm: RmsNorm,
    /// None when tied to the embedding matrix.
    pub lm_head: Option<Weight>,
    pub(crate) rope_global: Rope,
    pub(crate) rope_local: Option<Rope>,
    pub device: Device,
    /// The activations' dtype: f32 on the CPU; the compute dtype on a GPU (`to_device`).
    pub(crate) act_dtype: DType,
    /// Attention through `kernels::device_ops` (always off the CPU; on the CPU only when asked,
    /// to compare the GPU's path with the CPU kernels).
    pub(crate) portable: bool,
}

impl Decoder {
    /// Builds the decoder from Hugging Face tensor names (the layout table's), checking every
    /// shape against the config.
    pub fn from_weights(cfg: ModelConfig, w: &mut WeightMap) -> Result<Decoder> {
        let (eps, plus_one) = (cfg.rms_norm_eps, cfg.norm_plus_one);
        let stored = Layout::stored(&cfg);
        let top = |w: &mut WeightMap, t: TopTensor| w.take(t.name, &t.shape, t.why);
        let matrix = |b: Block| Weight::stack(vec![b]);
        let embed = matrix(top(w, stored.embed())?)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            // A checkpoint holding the fused tensor is read fused, whatever its family.
            let fused = |slot| w.contains(&stored.slot_name(l, slot, Part::Weight));
            let layout = Layout::with_storage(&cfg, fused(Slot::Qkv), fused(Slot::GateUp));
            // The pieces of each slot, in row order (the table lists them so).
            let mut pieces: HashMap<(Slot, Part), Vec<Block>> = HashMap::new();
            for t in layout.layer_tensors() {
                let x = w.take(&t.name(l), &t.shape, t.why)?;
                pieces.entry((t.slot, t.part)).or_default().push(x);
            }
            // Vectors (norms, biases) are f32 whatever the storage.
            fn vector(
                pieces: &mut HashMap<(Slot, Part), Vec<Block>>,
                slot: Slot,
                part: Part,
            ) -> Result<Option<Tensor>> {
                let Some(v) = pieces.remove(&(slot, part)) else {
                    return Ok(None);
                };
                let v = v.iter().map(|b| b.to_f32()).collect::<Result<Vec<_>>>()?;
                Ok(Some(Tensor::cat(&v, 0)?))
            }
            let mut linear = |slot| -> Result<Linear> {
                let bias = vector(&mut pieces, slot, Part::Bias)?;
                let parts = pieces
                    .remove(&(slot, Part::Weight))
                    .expect("the table lists every weight");
                Ok(Linear::new(Weight::stack(parts)?, bias))
            };
            let (qkv, o, gate_up, down) = (
                linear(Slot::Qkv)?,
                linear(Slot::O)?,
                linear(Slot::GateUp)?,
                linear(Slot::Down)?,
            );
            let mut norm = |slot| -> Result<Option<RmsNorm>> {
                vector(&mut pieces, slot, Part::Weight)?
                    .map(|t| RmsNorm::new(t, plus_one, eps))
                    .transpose()
            };
            let present = "the table lists this norm for every config";
            layers.push(Layer {
                attn_in_norm: norm(Slot::AttnInNorm)?.expect(present),
                attn: Attention {
                    qkv,
                    o,
                    q_norm: norm(Slot::QNorm)?,
                    k_norm: norm(Slot::KNorm)?,
                },
                attn_out_norm: norm(Slot::AttnOutNorm)?,
                mlp_in_norm: norm(Slot::MlpInNorm)?.expect(present),
                mlp: Mlp { gate_up, down },
                mlp_out_norm: norm(Slot::MlpOutNorm)?,
                kind: cfg.layer_types[l],
                residual_scale: 1.0,
            });
        }
        let final_norm = RmsNorm::new(top(w, stored.final_norm())?.to_f32()?, plus_one, eps)?;
        let head = stored.lm_head();
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints still carry a copy; it must equal the embedding, so drop it.
            let _ = w.take_opt(head.name, &head.shape, head.why)?;
            None
        } else {
            Some(matrix(top(w, head)?)?)
        };
        let leftover: Vec<String> = w
            .remaining()
            .into_iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !leftover.is_empty() {
            bail!(
                "{}: {} tensors are not used by a {:?} model, e.g. {:?} (wrong architecture in \
                    config.json?)",
                w.origin,
                leftover.len(),
                cfg.family,
                &leftover[..leftover.len().min(5)]
            );
        }
        let rope_global = Rope::new(&cfg.rope, cfg.rotary_dim);
        let rope_local = cfg
            .rope_local
            .as_ref()
            .map(|r| Rope::new(r, cfg.rotary_dim));
        Ok(Decoder {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_global,
            rope_local,
            device: Device::Cpu,
            act_dtype: DType::F32,
            portable: false,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.cfg.num_layers
    }

    /// Token embeddings `[B, T, H]` (scaled for Gemma).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self
            .embed
            .rows_f32(&ids.to_device(&self.device)?)?
            .to_dtype(self.act_dtype)?
            .reshape((b, t, self.cfg.hidden_size))?;
        Ok(match self.cfg.embed_scale {
            Some(s) => (x * (s as f32) as f64)?,
            None => x,
        })
    }

    fn attention(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &StepCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let layer = &self.layers[l];
        let cfg = &self.cfg;
        let (b, t) = (ctx.batch, ctx.new_tokens);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let qkv = ctx.on_live_rows(x, |x| layer.attn.qkv.forward(x))?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, start * hd, n * hd)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?)
        };
        let mut q = heads(0, nh)?;
        let mut k = heads(nh, nkv)?;
        let v = heads(nh + nkv, nkv)?.contiguous()?;
        if let Some(n) = &layer.attn.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &layer.attn.k_norm {
            k = n.forward(&k)?;
        }
        let (cos, sin) = match (&ctx.rope_local, layer.kind) {
            (Some(local), AttentionKind::Sliding) => local,
            _ => &ctx.rope_global,
        };
        let q = rope::apply(&q, cos, sin, cfg.rotary_dim)?;
        let k = rope::apply(&k, cos, sin, cfg.rotary_dim)?.contiguous()?;
        let (k, v) = match cache {
            Some(c) => match (c.layers[l].take(), c.append) {
                // Appended in place where the layer's buffer has room (`KvCache::append`).
                (Some(past), true) => c.append(l, past, (k, v))?,
                // A shared prefix is held as one row for the whole batch.
                (Some((pk, pv)), false) => {
                    let kv = (join_positions(&pk, &k)?, join_positions(&pv, &v)?);
                    c.layers[l] = Some((pk, pv));
                    kv
                }
                (None, append) => {
                    if append {
                        c.layers[l] = Some((k.clone(), v.clone()));
                    }
                    (k, v)
                }
            },
            None => (k, v),
        };
        let sliding = layer.kind == AttentionKind::Sliding && ctx.mask_sliding_raw.is_some();
        if let Some(full) = &ctx.mask_full {
            // Off the CPU: candle's ops (cuBLAS products, a fused softmax).
            let mask = match (&ctx.mask_sliding, sliding) {
                (Some(m), true) => m,
                _ => full,
            };
            let out = crate::kernels::device_ops::attention(
                &q,
                &k,
                &v,
                mask,
                cfg.attn_scale,
                cfg.attn_softcap,
            )?;
            let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            return layer.attn.o.forward(&out);
        }
        let mask = if sliding {
            ctx.mask_sliding_raw.as_ref().expect("checked")
        } else {
            &ctx.mask_full_raw
        };
        let out = crate::kernels::attention::attention(
            &q,
            &k,
            &v,
            mask,
            cfg.attn_scale as f32,
            cfg.attn_softcap.map(|c| c as f32),
        )?;
        let out = out.transpose(1, 2)?;
        // The real rows' gather reads the heads' transposed view in place; only the whole
        // batch's product needs it copied into rows.
        let out = match ctx.live {
            Some(_) => out,
            None => out.reshape((b, t, nh * hd))?,
        };
        ctx.on_live_rows(&out, |x| layer.attn.o.forward(x))
    }

    fn mlp(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let m = &self.layers[l].mlp;
        let gu = m.gate_up.forward(x)?;
        if gu.device().is_cpu() && gu.dtype() == DType::F32 && !gu.track_op() {
            let h = crate::train::ops::act::gated_infer(&gu, self.cfg.activation)?;
            return m.down.forward(&h);
        }
        let i = self.cfg.intermediate_size;
        let gate = gu.narrow(D::Minus1, 0, i)?;
        let up = gu.narrow(D::Minus1, i, i)?;
        m.down.forward(&(act(self.cfg.activation, &gate)? * up)?)
    }

    /// Runs layers `range` on the residual stream `x`, applying the spec's edits and recording
    /// its reads at every hook point on the way.
    pub fn run_layers(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        ctx: &StepCtx,
        mut cache: Option<&mut KvCache>,
        hooks: &HookSpec,
        acts: &mut ActivationCache,
    ) -> Result<Tensor> {
        for l in range {
            x = hooks.apply(Hook::ResidPre(l), x, acts)?;
            let layer = &self.layers[l];
            let h = layer.attn_in_norm.forward(&x)?;
            let mut a = self.attention(l, &h, ctx, cache.as_deref_mut())?;
            if let Some(n) = &layer.attn_out_norm {
                a = n.forward(&a)?;
            }
            if layer.residual_scale != 1.0 {
                a = (a * layer.residual_scale)?;
            }
            let a = hooks.apply(Hook::AttnOut(l), a, acts)?;
            x = (x + a)?;
            let h = layer.mlp_in_norm.forward(&x)?;
            let mut m = ctx.on_live_rows(&h, |h| self.mlp(l, h))?;
            if let Some(n) = &layer.mlp_out_norm {
                m = n.forward(&m)?;
            }
            if layer.residual_scale != 1.0 {
                m = (m * layer.residual_scale)?;
            }
            let m = hooks.apply(Hook::MlpOut(l), m, acts)?;
            x = (x + m)?;
            x = hooks.apply(Hook::ResidPost(l), x, acts)?;
        }
        Ok(x)
    }

    /// Final norm (the `FinalNorm` hook point) and the logits of the last position only or of
    /// every position.
    pub fn head(
        &self,
        x: &Tensor,
        logits: Logits,
        hooks: &HookSpec,
        acts: &mut ActivationCache,
    ) -> Result<Tensor> {
        let normed = self.final_normed(x, hooks, acts)?;
        let h = match logits {
            Logits::Last => {
                let t = normed.dim(1)?;
                normed.narrow(1, t - 1, 1)?
            }
            Logits::All => normed,
        };
        self.lm_logits(&h)
    }

    fn final_normed(
        &self,
        x: &Tensor,
        hooks: &HookSpec,
        acts: &mut ActivationCache,
    ) -> Result<Tensor> {
        let normed = self.final_norm.forward(x)?;
        hooks.apply(Hook::FinalNorm, normed, acts)
    }

    /// Logits of final-normed hidden states `[..., H]` (lm_head, or the tied embedding, then
    /// Gemma2's final soft-cap).
    pub fn lm_logits(&self, h: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut head = Linear::new(w.clone(), None);
        if self.portable {
            head.grad = crate::model::LinearGrad::Autograd;
        }
        let mut out = head.forward(h)?;
        if let Some(cap) = self.cfg.final_softcap {
            out = ((out / cap)?.tanh()? * cap)?;
        }
        // Callers read logits as f32 whatever the compute dtype.
        Ok(out.to_dtype(DType::F32)?)
    }

    /// Logits of left-padded `ids: [B, T]` (u32) after `cache` (if any): `[B, 1, V]` for
    /// `Logits::Last`, `[B, T, V]` for `Logits::All`.
    pub fn logits(
        &self,
        ids: &Tensor,
        pads: &[usize],
        cache: Option<&mut KvCache>,
        which: Logits,
    ) -> Result<Tensor> {
        Ok(self.forward(ids, pads, cache, &HookSpec::none(), which)?.0)
    }

    /// As `logits`, from layer `start` on, given the residual stream entering it (see
    /// `forward_from`).
    pub fn logits_from(
        &self,
        x: Tensor,
        start: usize,
        pads: &[usize],
        cache: Option<&mut KvCache>,
        which: Logits,
    ) -> Result<Tensor> {
        Ok(self
            .forward_from(x, start, pads, cache, &HookSpec::none(), which)?
            .0)
    }

    /// The whole forward pass over left-padded `ids: [B, T]` (u32) after `cache` (if any), with
    /// the spec's edits applied: the logits (as `logits`) and the activations it read.
    pub fn forward(
        &self,
        ids: &Tensor,
        pads: &[usize],
        cache: Option<&mut KvCache>,
        hooks: &HookSpec,
        which: Logits,
    ) -> Result<(Tensor, ActivationCache)> {
        let x = self.embed(ids)?;
        self.forward_from(x, 0, pads, cache, hooks, which)
    }

    /// The forward pass from layer `start` on, given the residual stream `x: [B, T, H]` entering
    /// it (and, in `cache`, the keys/values of layers below `start` for earlier positions).
    pub fn forward_from(
        &self,
        x: Tensor,
        start: usize,
        pads: &[usize],
        cache: Option<&mut KvCache>,
        hooks: &HookSpec,
        which: Logits,
    ) -> Result<(Tensor, ActivationCache)> {
        let (logits, acts) = self.pass(x, start, pads, cache, hooks, Some(which))?;
        Ok((logits.expect("logits asked for"), acts))
    }

    /// Only the activations the spec reads: layers past the deepest read are skipped and no
    /// logits are computed.
    pub fn activations(
        &self,
        ids: &Tensor,
        pads: &[usize],
        cache: Option<&mut KvCache>,
        hooks: &HookSpec,
    ) -> Result<ActivationCache> {
        let x = self.embed(ids)?;
        Ok(self.pass(x, 0, pads, cache, hooks, None)?.1)
    }

    /// One forward pass; with `logits` None it stops after the deepest read.
    fn pass(
        &self,
        x: Tensor,
        start: usize,
        pads: &[usize],
        cache: Option<&mut KvCache>,
        hooks: &HookSpec,
        logits: Option<Logits>,
    ) -> Result<(Option<Tensor>, ActivationCache)> {
        let (_, t, _) = x.dims3()?;
        let past = cache.as_ref().map(|c| c.len_at(start)).unwrap_or(0);
        let shared = cache.as_ref().map(|c| c.shared).unwrap_or(0);
        let ctx = self.step_ctx_shared(pads, shared, past, t)?;
        let mut acts = ActivationCache::default();
        let stop = match (logits, hooks.layers_needed()) {
            (None, Some(k)) => k.min(self.num_layers()),
            _ => self.num_layers(),
        };
        let x = self.run_layers(x, start..stop.max(start), &ctx, cache, hooks, &mut acts)?;
        if stop < self.num_layers() {
            hooks.apply(Hook::ResidPre(stop), x, &mut acts)?;
            return Ok((None, acts));
        }
        let out = match logits {
            Some(which) => Some(self.head(&x, which, hooks, &mut acts)?),
            None => {
                self.final_normed(&x, hooks, &mut acts)?;
                None
            }
        };
        Ok((out, acts))
    }

    /// The activations' dtype: f32 on the CPU whatever the weights' storage; the compute dtype
    /// on a GPU.
    pub fn dtype(&self) -> DType {
        self.act_dtype
    }

    /// Moves the decoder to `device`, its matrices dense in `dtype` (the activations' dtype
    /// there) and its norm weights in f32; each CPU matrix is freed as its copy is made. The CPU
    /// keeps its own kernels and storage, so moving there is only allowed from the CPU.
    pub fn to_device(&mut self, device: &Device, dtype: DType) -> Result<()> {
        if device.is_cpu() {
            if !self.device.is_cpu() {
                bail!(
                    "a decoder on {:?} cannot be moved back to the CPU",
                    self.device
                );
            }
            return Ok(());
        }
        self.move_to(device, dtype)
    }

    /// The GPU's whole path on the CPU, computing in `dtype` (matrices dense in it, candle's
    /// matmul, masks and attention through `device_ops`), so that tests can check its dtype
    /// handling (a GPU's bf16) without a GPU.
    pub fn use_portable_ops_as(&mut self, dtype: DType) -> Result<()> {
        self.move_to(&self.device.clone(), dtype)?;
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.grad = crate::model::LinearGrad::Autograd;
            }
        }
        Ok(())
    }

    fn move_to(&mut self, device: &Device, dtype: DType) -> Result<()> {
        let f32_on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
        let move_norm = |n: &mut RmsNorm| -> Result<()> {
            n.weight = f32_on(&n.weight)?;
            Ok(())
        };
        self.embed = self.embed.to_device(device, dtype)?;
        if let Some(h) = &mut self.lm_head {
            *h = h.to_device(device, dtype)?;
        }
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.weight = lin.weight.to_device(device, dtype)?;
                if let Some(bias) = &mut lin.bias {
                    *bias = bias.to_device(device)?.to_dtype(dtype)?;
                }
            }
            move_norm(&mut layer.attn_in_norm)?;
            move_norm(&mut layer.mlp_in_norm)?;
            for n in [
                &mut layer.attn.q_norm,
                &mut layer.attn.k_norm,
                &mut layer.attn_out_norm,
                &mut layer.mlp_out_norm,
            ]
            .into_iter()
            .flatten()
            {
                move_norm(n)?;
            }
        }
        move_norm(&mut self.final_norm)?;
        self.device = device.clone();
        self.act_dtype = dtype;
        self.portable = true;
        Ok(())
    }

    /// Runs attention through the GPU's device-generic ops on the CPU too, so that tests can
    /// hold that path to the CPU kernels without a GPU.
    pub fn use_portable_ops(&mut self, on: bool) {
        self.portable = on || !self.device.is_cpu();
    }

    /// The matrices: embedding, every layer's projections, the head (when untied).
    fn matrices(&self) -> Vec<&Weight> {
        let mut all = vec![&self.embed];
        for l in &self.layers {
            all.extend(l.linears().map(|lin| &lin.weight));
        }
        all.extend(&self.lm_head);
        all
    }

    /// Bytes the matrices (embedding, projections, head) take in memory.
    pub fn weight_bytes(&self) -> usize {
        self.matrices().iter().map(|w| w.bytes()).sum()
    }

    /// The storage of the projection matrices, embedding and head: `f32`, `bf16`, or the
    /// quantized types found (`Q4_K+Q6_K`).
    pub fn weight_storage(&self) -> String {
        let mut seen: Vec<String> = vec![];
        for w in self.matrices() {
            for b in w.blocks() {
                let s = b.storage();
                if !seen.contains(&s) {
                    seen.push(s);
                }
            }
        }
        seen.join("+")
    }

    /// The compute dtype this decoder gets on a GPU (`device::gpu_compute_dtype` of its
    /// matrices' storage and size).
    pub fn gpu_compute_dtype(&self) -> DType {
        let (mut dense, mut params) = (vec![], 0);
        for w in self.matrices() {
            params += w.elem_count();
            for b in w.blocks() {
                if let Block::Dense(t) = b {
                    dense.push(t.dtype());
                }
            }
        }
        crate::device::gpu_compute_dtype(&dense, params)
    }
}

/// Which positions' logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Each row's last position: `[B, 1, V]`.
    Last,
    /// Every position: `[B, T, V]`.
    All,
}
