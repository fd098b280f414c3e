//! TransformerLens-style runs over a list of prompts: `run_with_cache` (logits at the last token
//! and the activations at named hook points) and `run_with_hooks` (logits of a forward pass with
//! edits), batched as extraction batches them: longest first, left-padded, the template head
//! every prompt shares computed once when only last-token positions are read or edited.

use crate::infer::generate::{batch_cache, left_pad, shared_head_kv, shared_prefix_len};
use crate::io::loader::Model;
use crate::model::hooks::{ActivationCache, Edit, Hook, HookSpec, Positions};
use crate::model::{Decoder, Logits};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// Prompts per forward pass for the `Model` methods (the CLI's default batch size).
pub const RUN_BATCH_SIZE: usize = 16;

impl Decoder {
    /// Hook names (`resid_pre.K`, `resid_post.K`, `attn_out.K`, `mlp_out.K`, `hidden.K`,
    /// `final_norm`) as reads at `pos`; an unknown or out-of-range name is an error naming it.
    pub fn parse_reads(&self, names: &[&str], pos: Positions) -> Result<HookSpec> {
        let mut spec = HookSpec::none();
        for name in names {
            spec = spec.read(Hook::parse(name, self.num_layers())?, pos);
        }
        Ok(spec)
    }

    /// Logits at each prompt's last token (`[N, V]`, in prompt order) and the activations at the
    /// named hooks, keyed by hook and by name: `[N, H]` at `Positions::Last`; `[N, T, H]` at
    /// `Positions::All`, each row left-padded with zeros to the longest prompt's `T`.
    pub fn run_with_cache<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        names: &[&str],
        pos: Positions,
        batch_size: usize,
    ) -> Result<(Tensor, ActivationCache)> {
        let spec = self.parse_reads(names, pos)?;
        let (logits, mut cache) = self.run_batched(prompts, &spec, batch_size)?;
        for name in names {
            cache.names.insert(
                name.to_string(),
                (Hook::parse(name, self.num_layers())?, pos),
            );
        }
        Ok((logits, cache))
    }

    /// Logits at each prompt's last token (`[N, V]`) of the forward pass with `hooks`' edits.
    /// A `Replace` tensor with one row per prompt (`[N, H]` at `Last`, `[N, T, H]` at `All`, as
    /// `run_with_cache` returns them) patches each prompt with its own row; any other tensor
    /// broadcasts over every row.
    pub fn run_with_hooks<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        hooks: &HookSpec,
        batch_size: usize,
    ) -> Result<Tensor> {
        Ok(self.run_batched(prompts, hooks, batch_size)?.0)
    }

    fn run_batched<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        spec: &HookSpec,
        batch_size: usize,
    ) -> Result<(Tensor, ActivationCache)> {
        let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| p.as_ref().to_vec()).collect();
        if prompts.is_empty() {
            bail!("no prompts to run");
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt {i} has no tokens");
        }
        let n = prompts.len();
        let t_max = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
        // Every-position reads and edits must see the head's positions too.
        let shared = if spec.touches_all_positions() {
            0
        } else {
            shared_prefix_len(&prompts)
        };
        let head = shared_head_kv(self, &prompts, shared)?;
        let mut logits: Vec<Option<Tensor>> = vec![None; n];
        let mut reads: Vec<Vec<Option<Tensor>>> = vec![vec![None; n]; spec.reads.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| &prompts[i][shared..]).collect();
            let (ids, pads) = left_pad(&rows, &self.device)?;
            let t_b = ids.dim(1)?;
            let batch_spec = spec_for_rows(spec, chunk, n, t_max, t_b)?;
            let mut kv = batch_cache(self, head.as_ref(), shared);
            kv.append = false; // the batch's own keys/values are not needed after each layer
            let (lg, acts) = crate::kernels::on_workers(|| {
                self.forward(&ids, &pads, Some(&mut kv), &batch_spec, Logits::Last)
            })?;
            let lg = lg.squeeze(1)?;
            for (r, &i) in chunk.iter().enumerate() {
                logits[i] = Some(lg.get(r)?);
            }
            for (slot, (hook, pos)) in reads.iter_mut().zip(&spec.reads) {
                let t = acts.get(*hook, *pos).expect("read during the pass");
                for (r, &i) in chunk.iter().enumerate() {
                    let row = t.get(r)?;
                    slot[i] = Some(match pos {
                        Positions::Last => row,
                        Positions::All => {
                            let real = row.narrow(0, pads[r], t_b - pads[r])?;
                            let (len, h) = real.dims2()?;
                            let zeros =
                                Tensor::zeros((t_max - len, h), real.dtype(), real.device())?;
                            Tensor::cat(&[&zeros, &real], 0)?
                        }
                    });
                }
            }
        }
        let stack = |v: Vec<Option<Tensor>>| -> Result<Tensor> {
            let v: Vec<Tensor> = v
                .into_iter()
                .map(|t| t.expect("every prompt run"))
                .collect();
            Ok(Tensor::stack(&v, 0)?)
        };
        let mut cache = ActivationCache::default();
        for (slot, (hook, pos)) in reads.into_iter().zip(&spec.reads) {
            cache.tensors.insert((*hook, *pos), stack(slot)?);
        }
        Ok((stack(logits)?, cache))
    }
}

/// The spec for one batch: `Replace` tensors with a row per prompt cut to the batch's rows (and,
/// at every position, to the batch's `t_b` last positions of the longest prompt's `t_max`).
fn spec_for_rows(
    spec: &HookSpec,
    rows: &[usize],
    n: usize,
    t_max: usize,
    t_b: usize,
) -> Result<HookSpec> {
    let mut out = HookSpec {
        reads: spec.reads.clone(),
        edits: Vec::with_capacity(spec.edits.len()),
    };
    let idx = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        &candle_core::Device::Cpu,
    )?;
    for (hook, pos, edit) in &spec.edits {
        let per_prompt_rank = match pos {
            Positions::Last => 2,
            Positions::All => 3,
        };
        let edit = match edit {
            Edit::Replace(t) if t.rank() == per_prompt_rank => {
                let what = || format!("edit at {}: patch of shape {:?}", hook.name(), t.dims());
                if t.dim(0)? != n {
                    bail!("{}: expected one row per prompt ({n})", what());
                }
                let mut t = t
                    .index_select(&idx.to_device(t.device())?, 0)
                    .with_context(what)?;
                if *pos == Positions::All {
                    if t.dim(1)? != t_max {
                        bail!(
                            "{}: expected {t_max} positions (the longest prompt)",
                            what()
                        );
                    }
                    t = t.narrow(1, t_max - t_b, t_b)?;
                }
                Edit::Replace(t)
            }
            e => e.clone(),
        };
        out.edits.push((*hook, *pos, edit));
    }
    Ok(out)
}

impl Model {
    /// `Decoder::run_with_cache` in batches of [`RUN_BATCH_SIZE`] over token ids or formatted
    /// [`crate::Prompt`]s.
    ///
    /// ```no_run
    /// use sl_engine::{Model, Positions, PromptRecord, Template};
    ///
    /// # fn main() -> anyhow::Result<()> {
    /// let model = Model::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    /// let records = [PromptRecord::new("How do I pick a lock?"), PromptRecord::new("Hi!")];
    /// let prompts = model.prompts(&records, Template::Alpaca)?;
    /// let (logits, cache) =
    ///     model.run_with_cache(&prompts, &["resid_pre.3", "mlp_out.5"], Positions::Last)?;
    /// assert_eq!(logits.dims(), &[2, model.cfg().vocab_size]);
    /// let resid = cache.by_name("resid_pre.3").expect("read"); // [2, hidden]
    /// # let _ = resid;
    /// # Ok(())
    /// # }
    /// ```
    pub fn run_with_cache<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        names: &[&str],
        pos: Positions,
    ) -> Result<(Tensor, ActivationCache)> {
        self.decoder
            .run_with_cache(prompts, names, pos, RUN_BATCH_SIZE)
    }

    /// `Decoder::run_with_hooks` in batches of [`RUN_BATCH_SIZE`].
    ///
    /// Activation patching: the clean prompts' layer-5 input at the last token, written into
    /// the corrupted prompts' forward pass.
    ///
    /// ```no_run
    /// use sl_engine::{Edit, Hook, HookSpec, Model, Positions};
    ///
    /// # fn main() -> anyhow::Result<()> {
    /// let model = Model::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    /// let clean = vec![model.tokenizer.encode("The capital of France is", true)?];
    /// let corrupt = vec![model.tokenizer.encode("The capital of Italy is", true)?];
    /// let (_, cache) = model.run_with_cache(&clean, &["resid_pre.5"], Positions::Last)?;
    /// let patch = cache.by_name("resid_pre.5").expect("read").clone(); // [1, hidden]
    /// let hooks = HookSpec::none().edit(Hook::ResidPre(5), Positions::Last, Edit::Replace(patch));
    /// let patched = model.run_with_hooks(&corrupt, &hooks)?; // [1, vocab]
    /// # let _ = patched;
    /// # Ok(())
    /// # }
    /// ```
    pub fn run_with_hooks<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        hooks: &HookSpec,
    ) -> Result<Tensor> {
        self.decoder.run_with_hooks(prompts, hooks, RUN_BATCH_SIZE)
    }
}

#[cfg(test)]
#[path = "hooked_tests.rs"]
mod tests;
