//! Named hook points, in the spirit of TransformerLens: callers ask for "the input of layer k at
//! the last token" and the decoder hands it over; nobody re-implements the forward pass.

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

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
            bail!("hook `{s}`: expected resid_pre.K, resid_post.K, attn_out.K, mlp_out.K, hidden.K or final_norm");
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

/// What a forward pass should hand back.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    pub hooks: Vec<(Hook, Positions)>,
}

impl Capture {
    pub fn none() -> Self {
        Capture::default()
    }

    /// Every `output_hidden_states` entry at the last token.
    pub fn all_hidden_last(num_layers: usize) -> Self {
        Capture {
            hooks: (0..=num_layers)
                .map(|k| (Hook::hidden_entry(k, num_layers), Positions::Last))
                .collect(),
        }
    }

    pub fn wants(&self, hook: Hook) -> bool {
        self.hooks.iter().any(|(h, _)| *h == hook)
    }

    /// Number of layers that must run to serve the hooks (None: all of them and the final norm).
    pub fn layers_needed(&self) -> Option<usize> {
        let mut deepest = 0usize;
        for (h, _) in &self.hooks {
            match h.layer_needed() {
                None => return None,
                Some(k) => deepest = deepest.max(k),
            }
        }
        Some(deepest)
    }
}

/// Tensors captured during one forward pass.
#[derive(Debug, Default)]
pub struct Captured {
    pub tensors: HashMap<(Hook, Positions), Tensor>,
}

impl Captured {
    pub(crate) fn record(&mut self, capture: &Capture, hook: Hook, x: &Tensor) -> Result<()> {
        for (h, pos) in &capture.hooks {
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
            self.tensors.insert((hook, *pos), t);
        }
        Ok(())
    }

    pub fn get(&self, hook: Hook, pos: Positions) -> Option<&Tensor> {
        self.tensors.get(&(hook, pos))
    }
}
