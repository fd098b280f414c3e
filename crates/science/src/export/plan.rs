//! The SPPFT freeze plan in the terms of other trainers: the Hugging Face parameter names of a
//! model (from its config alone, no weights), which of them a layer range freezes, and the same
//! selection written as axolotl `unfrozen_parameters` regexes and as PEFT LoRA targets.
//!
//! The rule and the plan are `finetune`'s own (`finetune::freeze`); the names come from the
//! engine's layout table.

use anyhow::{bail, Result};
use serde::Serialize;
use sl_engine::io::config::{Family, ModelConfig};
use sl_engine::model::layout::Layout;

pub use crate::finetune::freeze::{FreezeModule, FreezePlan};
#[cfg(test)]
use sl_engine::LayerRange;

/// Every parameter name `model.named_parameters()` yields for this config, in transformers'
/// registration order (the layout table's). A tied lm_head is the embedding's tensor and is
/// listed once, as transformers lists it.
pub fn hf_parameter_names(cfg: &ModelConfig) -> Vec<String> {
    Layout::stored(cfg).hf_names()
}

/// The freeze plan in the terms of other trainers.
impl FreezePlan {
    /// axolotl's `unfrozen_parameters`: axolotl freezes every parameter, then unfreezes those a
    /// pattern matches with Python `re.match` (anchored at the start only) after turning each
    /// `.` into a literal dot (older releases escape every dot, newer ones every dot not before
    /// `+`). So the patterns use `.` only as a literal separator and need no trailing wildcard;
    /// `$` ends the exact names.
    pub fn axolotl_unfrozen(&self) -> Vec<AxolotlPattern> {
        let mut out = Vec::new();
        let names = self.layout.hf_names();
        for name in names.iter().filter(|n| !n.starts_with("model.layers.")) {
            let keeps = match name.as_str() {
                "model.embed_tokens.weight" => "the token embeddings",
                "model.norm.weight" => "the final norm",
                "lm_head.weight" => "the output head",
                _ => name.as_str(),
            };
            out.push(AxolotlPattern {
                pattern: format!("^{name}$"),
                keeps: keeps.to_string(),
            });
        }
        let outside = self.outside_layers();
        if !outside.is_empty() {
            out.push(AxolotlPattern {
                pattern: format!("^model.layers.{}.", alternation(&outside)),
                keeps: format!("every parameter of layers outside {}", self.range),
            });
        }
        let inside: Vec<usize> = self.range.layers().collect();
        let frozen: Vec<String> = self
            .modules
            .iter()
            .map(|m| format!("{}.", m.hf_module()))
            .collect();
        out.push(AxolotlPattern {
            // A negative lookahead: in the range, everything whose submodule is not frozen.
            pattern: format!(
                "^model.layers.{}.(?!{})",
                alternation(&inside),
                frozen.join("|")
            ),
            keeps: format!(
                "layers {}: everything but {} (the layers' norms{})",
                self.range,
                self.modules
                    .iter()
                    .map(|m| m.hf_module())
                    .collect::<Vec<_>>()
                    .join(" and "),
                match self.modules.as_slice() {
                    [FreezeModule::Attn] => " and mlp",
                    [FreezeModule::Mlp] => " and self_attn",
                    _ => "",
                }
            ),
        });
        out
    }

    /// LoRA-SPPFT: adapters on the projections of every layer outside the range; inside it, on
    /// the projections of the submodules that are not frozen.
    pub fn lora_targets(&self) -> Result<LoraTargets> {
        let all: Vec<&'static str> = [FreezeModule::Attn, FreezeModule::Mlp]
            .iter()
            .flat_map(|m| self.projections(*m))
            .collect();
        let outside = self.outside_layers();
        if self.modules.len() == 2 {
            if outside.is_empty() {
                bail!(
                    "the range {} covers every layer of the model (0-{}): LoRA-SPPFT would have \
                     no layer to adapt",
                    self.range,
                    self.num_layers - 1
                );
            }
            return Ok(LoraTargets::Layers {
                target_modules: all.iter().map(|s| s.to_string()).collect(),
                layers_to_transform: outside,
            });
        }
        // One submodule frozen: PEFT's layers_to_transform applies to every target module, so the
        // selection is one regex that PEFT matches in full against each module name.
        let kept = if self.freezes(FreezeModule::Attn) {
            FreezeModule::Mlp
        } else {
            FreezeModule::Attn
        };
        let projections =
            |m: FreezeModule| format!("{}\\.(?:{})", m.hf_module(), self.projections(m).join("|"));
        let every = format!(
            "(?:{}|{})",
            projections(FreezeModule::Attn),
            projections(FreezeModule::Mlp)
        );
        let inside: Vec<usize> = self.range.layers().collect();
        let regex = if outside.is_empty() {
            format!(
                "model\\.layers\\.{}\\.{}",
                alternation(&inside),
                projections(kept)
            )
        } else {
            format!(
                "model\\.layers\\.(?:{}\\.{}|{}\\.{})",
                alternation(&outside),
                every,
                alternation(&inside),
                projections(kept)
            )
        };
        Ok(LoraTargets::Regex(regex))
    }
}

/// `(?:0|1|13)`: layer numbers as an alternation (explicit, so `1` never matches `13`'s prefix:
/// every use is followed by a literal dot).
fn alternation(layers: &[usize]) -> String {
    format!(
        "(?:{})",
        layers
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("|")
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct AxolotlPattern {
    pub pattern: String,
    /// What the pattern keeps trainable, for the comment beside it.
    pub keeps: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum LoraTargets {
    /// `target_modules` as a list of module-name suffixes, restricted to `layers_to_transform`.
    Layers {
        target_modules: Vec<String>,
        layers_to_transform: Vec<usize>,
    },
    /// `target_modules` as one regex, matched in full against module names.
    Regex(String),
}

/// The paper's training recipe (Table 6 and its code), each value overridable on the command line.
#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub epochs: usize,
    pub lr: f64,
    /// Where `lr` came from: the paper's value for this model, the user, or the default.
    pub lr_source: String,
    pub lr_schedule: String,
    pub warmup_steps: usize,
    pub micro_batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub holdout: usize,
    pub seed: u64,
    pub train_on_inputs: bool,
    /// fp32 (the paper) or bf16.
    pub precision: String,
    pub grad_checkpointing: bool,
    pub lora_r: usize,
    pub lora_alpha: usize,
    pub lora_dropout: f64,
}

/// The paper's SPPFT learning rate for a model of this config (Table 6), with its source. Llama-2
/// and Llama-3 share an architecture; their vocabularies (32,000 and 128,256 tokens) tell them
/// apart. Models the paper did not train get `finetune`'s default.
pub fn paper_lr(cfg: &ModelConfig) -> (f64, String) {
    match cfg.family {
        Family::Llama if cfg.vocab_size >= 128_000 => (1e-4, "paper Table 6 (Llama-3)".into()),
        Family::Llama if cfg.vocab_size == 32_000 => (3e-4, "paper Table 6 (Llama-2)".into()),
        Family::Gemma | Family::Gemma2 | Family::Gemma3 => (1e-4, "paper Table 6 (gemma)".into()),
        Family::Phi3 => (6e-4, "paper Table 6 (Phi-3)".into()),
        _ => (
            1e-4,
            "finetune's default (the paper trained no model of this kind)".into(),
        ),
    }
}

impl Recipe {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0
            || self.micro_batch_size == 0
            || self.grad_accum == 0
            || self.max_len == 0
        {
            bail!("--epochs, --batch-size, --grad-accum and --max-len must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {}: must be a positive finite number", self.lr);
        }
        if !["linear", "cosine", "constant"].contains(&self.lr_schedule.as_str()) {
            bail!(
                "unknown --lr-schedule `{}` (expected linear, cosine or constant)",
                self.lr_schedule
            );
        }
        if !["fp32", "bf16"].contains(&self.precision.as_str()) {
            bail!(
                "unknown --precision `{}` (expected fp32, the paper's, or bf16)",
                self.precision
            );
        }
        for (flag, v) in [
            ("--weight-decay", self.weight_decay),
            ("--max-grad-norm", self.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} {v}: must be a finite number >= 0");
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("--lora-dropout {}: must be in [0, 1)", self.lora_dropout);
        }
        if self.lora_r == 0 || self.lora_alpha == 0 {
            bail!("--lora-r and --lora-alpha must be at least 1");
        }
        Ok(())
    }

    /// transformers' scheduler name for `lr_schedule`.
    pub fn hf_scheduler(&self) -> &'static str {
        match self.lr_schedule.as_str() {
            "cosine" => "cosine",
            "constant" => "constant_with_warmup",
            _ => "linear",
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
