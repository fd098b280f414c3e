//! The SPPFT freeze plan in the terms of other trainers: the Hugging Face parameter names of a
//! model (from its config alone, no weights), which of them a layer range freezes, and the same
//! selection written as axolotl `unfrozen_parameters` regexes and as PEFT LoRA targets.
//!
//! The rule is the one `finetune` applies: in layers `first..=last`, every parameter under
//! `self_attn` (projections, their biases, Qwen3/Gemma3 q/k norms) and/or under `mlp` is frozen;
//! the layers' own norms, the embeddings, the final norm and lm_head stay trainable.

use anyhow::{bail, Result};
use serde::Serialize;
use sl_engine::io::config::{Family, ModelConfig};
use sl_engine::LayerRange;

/// A part of a decoder layer that can be frozen, named as in `--freeze-modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeModule {
    Attn,
    Mlp,
}

impl FreezeModule {
    pub fn parse_list(items: &[String]) -> Result<Vec<FreezeModule>> {
        let mut out = Vec::new();
        for s in items {
            let m = match s.trim() {
                "attn" => FreezeModule::Attn,
                "mlp" => FreezeModule::Mlp,
                other => bail!("unknown --freeze-modules entry `{other}` (expected attn, mlp)"),
            };
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            bail!("--freeze-modules is empty: name attn, mlp or both");
        }
        out.sort();
        Ok(out)
    }

    /// The submodule's attribute name inside a transformers decoder layer.
    pub fn hf_module(self) -> &'static str {
        match self {
            FreezeModule::Attn => "self_attn",
            FreezeModule::Mlp => "mlp",
        }
    }

    /// The linear layers of this submodule as transformers names them for `family` (the names a
    /// LoRA config targets). Phi-3 stores q/k/v and gate/up fused.
    pub fn projections(self, family: Family) -> &'static [&'static str] {
        match (self, family == Family::Phi3) {
            (FreezeModule::Attn, true) => &["qkv_proj", "o_proj"],
            (FreezeModule::Attn, false) => &["q_proj", "k_proj", "v_proj", "o_proj"],
            (FreezeModule::Mlp, true) => &["gate_up_proj", "down_proj"],
            (FreezeModule::Mlp, false) => &["gate_proj", "up_proj", "down_proj"],
        }
    }
}

/// Every parameter name `model.named_parameters()` yields for this config, in transformers'
/// registration order. A tied lm_head is the embedding's tensor and is listed once, as
/// transformers lists it.
pub fn hf_parameter_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let attn = FreezeModule::Attn.projections(cfg.family);
        for proj in attn {
            names.push(format!("{p}.self_attn.{proj}.weight"));
            let biased = if *proj == "o_proj" {
                cfg.o_bias
            } else {
                cfg.qkv_bias
            };
            if biased {
                names.push(format!("{p}.self_attn.{proj}.bias"));
            }
        }
        if cfg.qk_norm {
            names.push(format!("{p}.self_attn.q_norm.weight"));
            names.push(format!("{p}.self_attn.k_norm.weight"));
        }
        for proj in FreezeModule::Mlp.projections(cfg.family) {
            names.push(format!("{p}.mlp.{proj}.weight"));
            if cfg.mlp_bias {
                names.push(format!("{p}.mlp.{proj}.bias"));
            }
        }
        names.push(format!("{p}.input_layernorm.weight"));
        names.push(format!("{p}.post_attention_layernorm.weight"));
        if cfg.sandwich_norms {
            names.push(format!("{p}.pre_feedforward_layernorm.weight"));
            names.push(format!("{p}.post_feedforward_layernorm.weight"));
        }
    }
    names.push("model.norm.weight".to_string());
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".to_string());
    }
    names
}

/// `model.layers.N.<module>.` → (N, module); None for anything outside the decoder layers.
fn layer_and_module(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let module = tail.split('.').next()?;
    Some((layer.parse().ok()?, module))
}

/// What to freeze, checked against the model's shape.
#[derive(Debug, Clone, Serialize)]
pub struct FreezePlan {
    pub family: Family,
    pub architecture: String,
    pub num_layers: usize,
    pub range: LayerRange,
    pub modules: Vec<FreezeModule>,
}

impl FreezePlan {
    pub fn new(
        cfg: &ModelConfig,
        range: LayerRange,
        modules: Vec<FreezeModule>,
    ) -> Result<FreezePlan> {
        if cfg.num_layers == 0 {
            bail!("the model config has no layers (num_hidden_layers = 0)");
        }
        // Re-check here so a range built elsewhere cannot slip past the model's bounds.
        let range = LayerRange::new(range.first, range.last, cfg.num_layers)?;
        if modules.is_empty() {
            bail!("nothing to freeze: no module named");
        }
        Ok(FreezePlan {
            family: cfg.family,
            architecture: cfg.architecture.clone(),
            num_layers: cfg.num_layers,
            range,
            modules,
        })
    }

    pub fn freezes(&self, m: FreezeModule) -> bool {
        self.modules.contains(&m)
    }

    /// The rule itself, on a Hugging Face parameter name.
    pub fn is_frozen(&self, name: &str) -> bool {
        match layer_and_module(name) {
            Some((l, module)) => {
                self.range.layers().contains(&l)
                    && self.modules.iter().any(|m| m.hf_module() == module)
            }
            None => false,
        }
    }

    /// (frozen, trainable) names of the model, in registration order.
    pub fn split(&self, cfg: &ModelConfig) -> (Vec<String>, Vec<String>) {
        hf_parameter_names(cfg)
            .into_iter()
            .partition(|n| self.is_frozen(n))
    }

    pub fn outside_layers(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|l| !self.range.layers().contains(l))
            .collect()
    }

    /// axolotl's `unfrozen_parameters`: axolotl freezes every parameter, then unfreezes those a
    /// pattern matches with Python `re.match` (anchored at the start only) after turning each
    /// `.` into a literal dot (older releases escape every dot, newer ones every dot not before
    /// `+`). So the patterns use `.` only as a literal separator and need no trailing wildcard;
    /// `$` ends the exact names.
    pub fn axolotl_unfrozen(&self, cfg: &ModelConfig) -> Vec<AxolotlPattern> {
        let mut out = Vec::new();
        for name in hf_parameter_names(cfg)
            .iter()
            .filter(|n| layer_and_module(n).is_none())
        {
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
            .flat_map(|m| m.projections(self.family).iter().copied())
            .collect();
        let outside = self.outside_layers();
        if self.modules.len() == 2 {
            if outside.is_empty() {
                bail!(
                    "the range {} covers every layer of the model (0-{}): LoRA-SPPFT would have no layer to adapt",
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
        let projections = |m: FreezeModule| {
            format!(
                "{}\\.(?:{})",
                m.hf_module(),
                m.projections(self.family).join("|")
            )
        };
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
