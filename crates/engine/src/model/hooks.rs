//! Named hook points, in the spirit of TransformerLens: callers ask for "the input of layer k at
//! the last token" and the decoder hands it over, or ask it to edit that activation (patch,
//! ablate, steer, project out) before the rest of the forward pass uses it; nobody
//! re-implements the forward pass.
//!
//! A [`HookSpec`] lists what to read and what to edit; the reads come back in an
//! [`ActivationCache`].

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// Residual stream entering layer k (= transformers `hidden_states[k]`, k = 0 is the
    /// embedding output, already scaled for Gemma).
    ResidPre(usize),
    /// Residual stream leaving layer k, before any final norm.
    ResidPost(usize),
    /// What the attention block of layer k adds to the residual stream.
    AttnOut(usize),
    /// What the MLP block of layer k adds to the residual stream.
    MlpOut(usize),
    /// After the final norm (= transformers `hidden_states[L]`).
    FinalNorm,
}

impl Hook {
    /// transformers' `output_hidden_states` entry k (0..=L) as a hook.
    pub fn hidden_entry(k: usize, num_layers: usize) -> Hook {
        if k >= num_layers {
            Hook::FinalNorm
        } else {
            Hook::ResidPre(k)
        }
    }

    /// Deepest layer whose computation the hook needs (None: needs the final norm).
    pub fn layer_needed(self) -> Option<usize> {
        match self {
            Hook::ResidPre(k) => Some(k), // available before layer k runs
            Hook::ResidPost(k) | Hook::AttnOut(k) | Hook::MlpOut(k) => Some(k + 1),
            Hook::FinalNorm => None,
        }
    }

    pub fn name(self) -> String {
        match self {
            Hook::ResidPre(k) => format!("resid_pre.{k}"),
            Hook::ResidPost(k) => format!("resid_post.{k}"),
            Hook::AttnOut(k) => format!("attn_out.{k}"),
            Hook::MlpOut(k) => format!("mlp_out.{k}"),
            Hook::FinalNorm => "final_norm".to_string(),
        }
    }

    /// Parses `resid_pre.K`, `resid_post.K`, `attn_out.K`, `mlp_out.K`, `final_norm` or
    /// `hidden.K` (transformers' entry K), checking K against the model's layers.
    pub fn parse(s: &str, num_layers: usize) -> Result<Hook> {
        if s == "final_norm" {
            return Ok(Hook::FinalNorm);
        }
        let Some((kind, k)) = s.split_once('.') else {
            bail!(
                "hook `{s}`: expected resid_pre.K, resid_post.K, attn_out.K, mlp_out.K, \
                hidden.K or final_norm"
            );
        };
        let k: usize = k
            .parse()
            .map_err(|_| anyhow::anyhow!("hook `{s}`: `{k}` is not a layer number"))?;
        let limit = if kind == "hidden" {
            num_layers
        } else {
            num_layers - 1
        };
        if k > limit {
            bail!("hook `{s}`: layer {k} is outside the model (0..={limit})");
        }
        Ok(match kind {
            "resid_pre" => Hook::ResidPre(k),
            "resid_post" => Hook::ResidPost(k),
            "attn_out" => Hook::AttnOut(k),
            "mlp_out" => Hook::MlpOut(k),
            "hidden" => Hook::hidden_entry(k, num_layers),
            _ => bail!("hook `{s}`: unknown kind `{kind}`"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Positions {
    /// The last prompt token of every row: `[B, H]`.
    Last,
    /// Every position: `[B, T, H]` (left-padded rows carry their padding at the front).
    All,
}

/// A user edit: gets the activation (`[B, H]` at `Positions::Last`, `[B, T, H]` at `All`) and
/// returns its replacement, of the same shape.
pub type EditFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// How an edit hook changes an activation `x` before the next computation reads it. Vectors
/// (`[H]`) and tensors broadcast against `x` from the right, so a `[B, H]` tensor read at
/// `Positions::Last` (e.g. from another prompt's [`ActivationCache`]) patches row by row.
#[derive(Clone)]
pub enum Edit {
    /// `x` replaced by the tensor: activation patching.
    Replace(Tensor),
    /// `x` set to zero: zero ablation.
    Zero,
    /// `x` replaced by a mean activation `[H]`: mean ablation.
    Mean(Tensor),
    /// `x + coeff * direction`: steering along `direction` (`[H]`).
    Add { direction: Tensor, coeff: f64 },
    /// `x - (x·d̂) d̂` with `d̂` the unit vector of `direction` (`[H]`): the component along
    /// `direction` removed.
    ProjectOut(Tensor),
    /// Anything else.
    Custom(EditFn),
}

impl std::fmt::Debug for Edit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Edit::Replace(t) => write!(f, "Replace({:?})", t.shape()),
            Edit::Zero => write!(f, "Zero"),
            Edit::Mean(t) => write!(f, "Mean({:?})", t.shape()),
            Edit::Add { direction, coeff } => {
                write!(
                    f,
                    "Add {{ direction: {:?}, coeff: {coeff} }}",
                    direction.shape()
                )
            }
            Edit::ProjectOut(t) => write!(f, "ProjectOut({:?})", t.shape()),
            Edit::Custom(_) => write!(f, "Custom(..)"),
        }
    }
}

impl Edit {
    /// A user closure as an edit.
    pub fn custom(f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Edit {
        Edit::Custom(Arc::new(f))
    }

    /// The edited activation (same shape, dtype and device as `x`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let like =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(x.dtype())?.to_device(x.device())?) };
        let out = match self {
            Edit::Replace(t) | Edit::Mean(t) => like(t)?.broadcast_as(x.shape())?.contiguous()?,
            Edit::Zero => x.zeros_like()?,
            Edit::Add { direction, coeff } => x.broadcast_add(&(like(direction)? * *coeff)?)?,
            Edit::ProjectOut(d) => {
                let d = like(d)?;
                let norm = d.sqr()?.sum_all()?.sqrt()?;
                let n = norm.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                if !(n.is_finite() && n > 0.0) {
                    bail!("cannot project out a direction of norm {n}");
                }
                let unit = d.broadcast_div(&norm)?;
                let along = x.broadcast_mul(&unit)?.sum_keepdim(D::Minus1)?;
                (x - along.broadcast_mul(&unit)?)?
            }
            Edit::Custom(f) => f(x)?,
        };
        if out.dims() != x.dims() {
            bail!(
                "the edit returned shape {:?} for an activation of shape {:?}",
                out.dims(),
                x.dims()
            );
        }
        Ok(out)
    }
}

/// What a forward pass should read (into an [`ActivationCache`]) and edit, by hook point.
/// Edits at a hook run in the order given, before the reads there: a read sees the activation
/// the rest of the forward pass uses.
///
/// Ablating layer 4's attention and steering layer 2's input along a direction, on the decoder's
/// own forward pass:
///
/// ```no_run
/// use sl_engine::{Edit, Hook, HookSpec, Logits, Model, Positions};
///
/// # fn main() -> anyhow::Result<()> {
/// let model = Model::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
/// let d = &model.decoder;
/// let refusal_direction = d.embed.to_f32()?.get(42)?; // any `[hidden]` vector
/// let hooks = HookSpec::none()
///     .edit(Hook::AttnOut(4), Positions::All, Edit::Zero)
///     .edit(Hook::ResidPre(2), Positions::Last, Edit::ProjectOut(refusal_direction))
///     .edit(Hook::MlpOut(6), Positions::All, Edit::custom(|x| Ok((x * 0.5)?)))
///     .read(Hook::ResidPost(8), Positions::Last);
/// let ids = model.tokenizer.encode("How do I bake bread?", true)?;
/// let ids = candle_core::Tensor::new(ids.as_slice(), &d.device)?.unsqueeze(0)?;
/// let (logits, cache) = d.forward(&ids, &[0], None, &hooks, Logits::Last)?; // [1, 1, vocab]
/// let resid = cache.get(Hook::ResidPost(8), Positions::Last).expect("read"); // [1, hidden]
/// # let _ = (logits, resid);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct HookSpec {
    pub reads: Vec<(Hook, Positions)>,
    pub edits: Vec<(Hook, Positions, Edit)>,
}

impl HookSpec {
    /// Neither reads nor edits: the plain forward pass.
    pub fn none() -> Self {
        HookSpec::default()
    }

    /// Every `output_hidden_states` entry at the last token.
    pub fn all_hidden_last(num_layers: usize) -> Self {
        HookSpec {
            reads: (0..=num_layers)
                .map(|k| (Hook::hidden_entry(k, num_layers), Positions::Last))
                .collect(),
            edits: vec![],
        }
    }

    /// Adds a read of `hook` at `pos`.
    pub fn read(mut self, hook: Hook, pos: Positions) -> Self {
        self.reads.push((hook, pos));
        self
    }

    /// Adds an edit of `hook` at `pos`.
    pub fn edit(mut self, hook: Hook, pos: Positions, edit: Edit) -> Self {
        self.edits.push((hook, pos, edit));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.edits.is_empty()
    }

    pub fn wants(&self, hook: Hook) -> bool {
        self.reads.iter().any(|(h, _)| *h == hook)
    }

    /// Whether any read or edit covers every position (the shared prompt head then cannot be
    /// computed apart from the rows).
    pub fn touches_all_positions(&self) -> bool {
        self.reads.iter().any(|(_, p)| *p == Positions::All)
            || self.edits.iter().any(|(_, p, _)| *p == Positions::All)
    }

    /// Number of layers that must run to serve the reads (None: all of them and the final
    /// norm). Edits past that point change nothing read.
    pub fn layers_needed(&self) -> Option<usize> {
        let mut deepest = 0usize;
        for (h, _) in &self.reads {
            match h.layer_needed() {
                None => return None,
                Some(k) => deepest = deepest.max(k),
            }
        }
        Some(deepest)
    }

    /// The activation `x` (`[B, T, H]`) at `hook` after this spec's edits, recording its reads
    /// into `cache`. Without hooks it hands `x` back untouched.
    pub(crate) fn apply(
        &self,
        hook: Hook,
        mut x: Tensor,
        cache: &mut ActivationCache,
    ) -> Result<Tensor> {
        if self.is_empty() {
            return Ok(x);
        }
        for (h, pos, edit) in &self.edits {
            if *h != hook {
                continue;
            }
            x = edit_at(&x, *pos, edit).with_context(|| format!("edit at {}", hook.name()))?;
        }
        cache.record(self, hook, &x)?;
        Ok(x)
    }
}

/// `edit` applied to every position of `x: [B, T, H]`, or to each row's last one only.
fn edit_at(x: &Tensor, pos: Positions, edit: &Edit) -> Result<Tensor> {
    match pos {
        Positions::All => edit.apply(x),
        Positions::Last => {
            let t = x.dim(1)?;
            let last = edit
                .apply(&x.narrow(1, t - 1, 1)?.squeeze(1)?)?
                .unsqueeze(1)?;
            if t == 1 {
                Ok(last)
            } else {
                Ok(Tensor::cat(&[&x.narrow(1, 0, t - 1)?, &last], 1)?)
            }
        }
    }
}

/// Activations read during a forward pass, by hook point and positions (TransformerLens's
/// name). `Model::run_with_cache` also keys them by the hook names it was given.
#[derive(Debug, Default)]
pub struct ActivationCache {
    pub tensors: HashMap<(Hook, Positions), Tensor>,
    /// Hook names as the caller spelled them (`hidden.3`, `mlp_out.5`), for `by_name`.
    pub names: HashMap<String, (Hook, Positions)>,
}

impl ActivationCache {
    pub(crate) fn record(&mut self, spec: &HookSpec, hook: Hook, x: &Tensor) -> Result<()> {
        for (h, pos) in &spec.reads {
            if *h != hook {
                continue;
            }
            let t = match pos {
                Positions::All => x.clone(),
                Positions::Last => {
                    let t = x.dim(1)?;
                    x.narrow(1, t - 1, 1)?.squeeze(1)?
                }
            };
            // Reads are f32 whatever the compute dtype (a GPU's bf16), as callers expect.
            self.tensors
                .insert((hook, *pos), t.to_dtype(candle_core::DType::F32)?);
        }
        Ok(())
    }

    pub fn get(&self, hook: Hook, pos: Positions) -> Option<&Tensor> {
        self.tensors.get(&(hook, pos))
    }

    /// The activation read under a name given to `run_with_cache`.
    pub fn by_name(&self, name: &str) -> Option<&Tensor> {
        self.names.get(name).and_then(|k| self.tensors.get(k))
    }
}
