//! The engine's one model description, read from a Hugging Face `config.json` in either the
//! transformers-4 layout (`rope_theta` + `rope_scaling`) or the transformers-5 layout
//! (`rope_parameters`, possibly keyed by layer type). Every family becomes a set of switches on
//! the single decoder in `model/decoder.rs`; nothing downstream looks at the family name again.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The architectures the decoder implements, as `config.json` names them.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    pub fn from_architecture(arch: &str) -> Option<Family> {
        Some(match arch {
            "LlamaForCausalLM" => Family::Llama,
            "MistralForCausalLM" => Family::Mistral,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen3ForCausalLM" => Family::Qwen3,
            "GemmaForCausalLM" => Family::Gemma,
            "Gemma2ForCausalLM" => Family::Gemma2,
            "Gemma3ForCausalLM" => Family::Gemma3,
            "Phi3ForCausalLM" => Family::Phi3,
            _ => return None,
        })
    }

    pub fn from_model_type(mt: &str) -> Option<Family> {
        Some(match mt {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Silu,
    /// tanh approximation of GELU (`gelu_pytorch_tanh` / `gelu_new`).
    GeluTanh,
    /// exact erf GELU (`gelu`).
    Gelu,
}

impl Activation {
    fn parse(name: &str, key: &str, file: &str) -> Result<Activation> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                bail!(
                    "{file}: field `{key}` names an unsupported activation {other:?} (supported: \
                     silu, gelu_pytorch_tanh, gelu)"
                )
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    Full,
    Sliding,
}

use crate::io::rope_config::parse_rope;
pub use crate::io::rope_config::{RopeConfig, RopeScaling};

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub family: Family,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// bias on q/k/v projections (Qwen2, Llama `attention_bias`).
    pub qkv_bias: bool,
    /// bias on o_proj (Llama `attention_bias` only).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm multiplies by (1 + w) instead of w (Gemma family).
    pub norm_plus_one: bool,
    /// Embedding output multiplied by sqrt(hidden) (Gemma family).
    pub embed_scale: Option<f64>,
    /// RMSNorm over each head of q and k before rope (Qwen3, Gemma3).
    pub qk_norm: bool,
    /// Extra norms after attention and after the MLP, before the residual add (Gemma2/3).
    pub sandwich_norms: bool,
    /// Multiplier of q·k (1/sqrt(head_dim) unless query_pre_attn_scalar says otherwise).
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub sliding_window: Option<usize>,
    pub layer_types: Vec<AttentionKind>,
    pub rope: RopeConfig,
    /// Rope of sliding layers where it differs from `rope` (Gemma3's local base frequency).
    pub rope_local: Option<RopeConfig>,
    /// Number of leading dimensions of each head that rope rotates (partial_rotary_factor).
    pub rotary_dim: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub torch_dtype: Option<String>,
}

pub(crate) fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

pub(crate) fn req_usize(v: &Value, key: &str, file: &str) -> Result<usize> {
    get(v, key)
        .ok_or_else(|| anyhow!("{file}: missing field `{key}`"))?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| {
            anyhow!(
                "{file}: field `{key}` must be a non-negative integer, got {}",
                v[key]
            )
        })
}

/// Upper bounds of the sizes a config declares. Far above any released model (405B Llama has 126
/// layers, 16384 hidden, 128 heads; Gemma 3 has a 262k vocabulary), they stop a hostile file from
/// sizing per-layer vectors or weight shapes by a count like 2^64 before the weights are read.
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_WIDTH: usize = 1 << 20;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_VOCAB: usize = 1 << 24;

/// A count checked against its upper bound, so no product of two counts overflows later.
fn at_most(n: usize, key: &str, max: usize, file: &str) -> Result<usize> {
    if n > max {
        bail!("{file}: field `{key}` is {n}, more than the supported maximum {max}");
    }
    Ok(n)
}

/// A required count that cannot be 0 (a model without layers, heads or vocabulary is a broken
/// config, and 0 would underflow later, e.g. `num_layers - 1` in hooks and scaling).
pub(crate) fn req_positive(v: &Value, key: &str, file: &str) -> Result<usize> {
    match req_usize(v, key, file)? {
        0 => bail!("{file}: field `{key}` must be at least 1, got 0"),
        n => Ok(n),
    }
}

pub(crate) fn opt_usize(v: &Value, key: &str, file: &str) -> Result<Option<usize>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            anyhow!("{file}: field `{key}` must be a non-negative integer, got {x}")
        }),
    }
}

pub(crate) fn opt_f64(v: &Value, key: &str, file: &str) -> Result<Option<f64>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("{file}: field `{key}` must be a number, got {x}")),
    }
}

pub(crate) fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    get(v, key).and_then(|x| x.as_bool())
}

/// `eos_token_id` may be an integer or a list of integers.
pub fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        ModelConfig::from_json(&v, &path.display().to_string())
    }

    pub fn from_json(v: &Value, file: &str) -> Result<ModelConfig> {
        let arch = get(v, "architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .map(str::to_string);
        let family = match &arch {
            Some(a) => Family::from_architecture(a),
            None => get(v, "model_type")
                .and_then(|m| m.as_str())
                .and_then(Family::from_model_type),
        };
        let Some(family) = family else {
            bail!(
                "{file}: unsupported architecture {} (supported: {})",
                arch.clone()
                    .or_else(|| get(v, "model_type").map(|m| m.to_string()))
                    .unwrap_or_else(|| "<none given>".into()),
                SUPPORTED_ARCHITECTURES.join(", ")
            );
        };
        let architecture = arch.unwrap_or_else(|| family.architecture().to_string());
        // Every size is bounded before anything is allocated or multiplied from it.
        let bounded = |key: &str, max: usize| -> Result<usize> {
            at_most(req_positive(v, key, file)?, key, max, file)
        };
        let hidden_size = bounded("hidden_size", MAX_WIDTH)?;
        let num_heads = at_most(
            req_usize(v, "num_attention_heads", file)?,
            "num_attention_heads",
            MAX_HEADS,
            file,
        )?;
        let num_layers = bounded("num_hidden_layers", MAX_LAYERS)?;
        let vocab_size = bounded("vocab_size", MAX_VOCAB)?;
        let intermediate_size = at_most(
            req_usize(v, "intermediate_size", file)?,
            "intermediate_size",
            MAX_WIDTH,
            file,
        )?;
        let num_kv_heads = match opt_usize(v, "num_key_value_heads", file)? {
            Some(n) => at_most(n, "num_key_value_heads", MAX_HEADS, file)?,
            None => num_heads,
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!(
                "{file}: num_attention_heads ({num_heads}) must be a positive multiple of \
                 num_key_value_heads ({num_kv_heads})"
            );
        }
        let head_dim = match opt_usize(v, "head_dim", file)? {
            Some(0) => bail!("{file}: field `head_dim` must be at least 1, got 0"),
            Some(h) => at_most(h, "head_dim", MAX_HEAD_DIM, file)?,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!(
                        "{file}: hidden_size {hidden_size} is not divisible by num_attention_heads \
                         {num_heads} and no head_dim is given"
                    );
                }
                hidden_size / num_heads
            }
        };
        let is_gemma = family.is_gemma();
        let act_key = if get(v, "hidden_activation").is_some() {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let act_name = get(v, act_key)
            .and_then(|x| x.as_str())
            .unwrap_or(if is_gemma {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            });
        // transformers' Gemma (v1) forces the tanh approximation whatever `hidden_act` says.
        let activation = if family == Family::Gemma {
            Activation::GeluTanh
        } else {
            Activation::parse(act_name, act_key, file)?
        };

        let sliding_window = match family {
            Family::Llama | Family::Gemma => None,
            Family::Qwen2 | Family::Qwen3 if opt_bool(v, "use_sliding_window") != Some(true) => {
                None
            }
            _ => opt_usize(v, "sliding_window", file)?,
        };
        // A window of 0 would leave a query no key to attend to (an all -inf softmax row).
        if sliding_window == Some(0) {
            bail!("{file}: field `sliding_window` must be at least 1, got 0");
        }
        let layer_types = Self::layer_types(v, family, num_layers, sliding_window, file)?;

        let query_pre_attn_scalar = opt_f64(v, "query_pre_attn_scalar", file)?;
        let attn_scale = match (family, query_pre_attn_scalar) {
            (Family::Gemma2 | Family::Gemma3, Some(s)) => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };

        let (rope, rope_local) = Self::ropes(v, family, file)?;
        // transformers-5 keeps partial_rotary_factor inside rope_parameters, 4 at the top level.
        let partial = match get(v, "rope_parameters")
            .map(|rp| opt_f64(rp, "partial_rotary_factor", file))
            .transpose()?
            .flatten()
        {
            Some(p) => p,
            None => opt_f64(v, "partial_rotary_factor", file)?.unwrap_or(1.0),
        };
        // rope indexes the first rotary_dim entries of each head: more than head_dim would read
        // past it.
        if !(partial > 0.0 && partial <= 1.0) {
            bail!("{file}: field `partial_rotary_factor` must be in (0, 1], got {partial}");
        }
        let rotary_dim = ((head_dim as f64) * partial) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
            bail!(
                "{file}: partial_rotary_factor {partial} gives an odd or zero rotary dimension \
                 {rotary_dim}"
            );
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope.scaling
        {
            if short_factor.len() != rotary_dim / 2 || long_factor.len() != rotary_dim / 2 {
                bail!(
                    "{file}: longrope short_factor/long_factor have {}/{} entries, expected \
                     rotary_dim/2 = {}",
                    short_factor.len(),
                    long_factor.len(),
                    rotary_dim / 2
                );
            }
        }

        let attention_bias = opt_bool(v, "attention_bias").unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Phi3 => (false, false),
            _ => (attention_bias, attention_bias),
        };
        let tie_default = matches!(family, Family::Gemma | Family::Gemma2 | Family::Gemma3);
        Ok(ModelConfig {
            family,
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps", file)?.unwrap_or(1e-6),
            activation,
            max_position_embeddings: opt_usize(v, "max_position_embeddings", file)?.unwrap_or(4096),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings").unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias: opt_bool(v, "mlp_bias").unwrap_or(false),
            norm_plus_one: is_gemma,
            embed_scale: is_gemma.then(|| (hidden_size as f64).sqrt()),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sandwich_norms: matches!(family, Family::Gemma2 | Family::Gemma3),
            attn_scale,
            attn_softcap: if family == Family::Gemma2 {
                opt_f64(v, "attn_logit_softcapping", file)?
            } else {
                None
            },
            final_softcap: if matches!(family, Family::Gemma2 | Family::Gemma3) {
                opt_f64(v, "final_logit_softcapping", file)?
            } else {
                None
            },
            sliding_window,
            layer_types,
            rope,
            rope_local,
            rotary_dim,
            bos_token_id: token_id_list(get(v, "bos_token_id")).first().copied(),
            eos_token_ids: token_id_list(get(v, "eos_token_id")),
            pad_token_id: token_id_list(get(v, "pad_token_id")).first().copied(),
            torch_dtype: get(v, "dtype")
                .or_else(|| get(v, "torch_dtype"))
                .and_then(|x| x.as_str())
                .map(str::to_string),
        })
    }

    fn layer_types(
        v: &Value,
        family: Family,
        n: usize,
        window: Option<usize>,
        file: &str,
    ) -> Result<Vec<AttentionKind>> {
        if let Some(list) = get(v, "layer_types").and_then(|x| x.as_array()) {
            if list.len() != n {
                bail!(
                    "{file}: layer_types has {} entries but num_hidden_layers is {n}",
                    list.len()
                );
            }
            return list
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(AttentionKind::Full),
                    Some("sliding_attention") => {
                        if window.is_none() {
                            bail!(
                                "{file}: layer_types names sliding_attention but no \
                                 sliding_window is set"
                            )
                        }
                        Ok(AttentionKind::Sliding)
                    }
                    _ => bail!("{file}: unknown layer type {t} in layer_types"),
                })
                .collect();
        }
        let sliding = |i: usize| -> Result<bool> {
            if window.is_none() {
                return Ok(false);
            }
            Ok(match family {
                Family::Gemma2 => i.is_multiple_of(2),
                Family::Gemma3 => {
                    let pattern = opt_usize(v, "sliding_window_pattern", file)?.unwrap_or(6);
                    pattern == 0 || !(i + 1).is_multiple_of(pattern)
                }
                Family::Qwen2 | Family::Qwen3 => {
                    i >= opt_usize(v, "max_window_layers", file)?.unwrap_or(0)
                }
                _ => true,
            })
        };
        (0..n)
            .map(|i| {
                Ok(if sliding(i)? {
                    AttentionKind::Sliding
                } else {
                    AttentionKind::Full
                })
            })
            .collect()
    }

    /// The global rope and, for Gemma3, the local one of sliding layers.
    fn ropes(v: &Value, family: Family, file: &str) -> Result<(RopeConfig, Option<RopeConfig>)> {
        let default_theta = if family == Family::Gemma3 {
            1_000_000.0
        } else {
            10_000.0
        };
        if let Some(rp) = get(v, "rope_parameters").filter(|x| x.is_object()) {
            // v5: either one rope description or one per layer type.
            if rp.get("full_attention").is_some() || rp.get("sliding_attention").is_some() {
                let one = |key: &str| -> Result<Option<RopeConfig>> {
                    match get(rp, key) {
                        None => Ok(None),
                        Some(p) => {
                            let theta = opt_f64(p, "rope_theta", file)?.unwrap_or(default_theta);
                            Ok(Some(parse_rope(Some(p), theta, v, file)?))
                        }
                    }
                };
                let full = one("full_attention")?.ok_or_else(|| {
                    anyhow!(
                        "{file}: rope_parameters is keyed by layer type but has no \
                         `full_attention` entry"
                    )
                })?;
                let local = one("sliding_attention")?;
                return Ok((full, local));
            }
            let theta = opt_f64(rp, "rope_theta", file)?
                .or(opt_f64(v, "rope_theta", file)?)
                .unwrap_or(default_theta);
            return Ok((parse_rope(Some(rp), theta, v, file)?, None));
        }
        let theta = opt_f64(v, "rope_theta", file)?.unwrap_or(default_theta);
        let global = parse_rope(get(v, "rope_scaling"), theta, v, file)?;
        let local = if family == Family::Gemma3 {
            let base = opt_f64(v, "rope_local_base_freq", file)?.unwrap_or(10_000.0);
            Some(RopeConfig {
                theta: base,
                scaling: RopeScaling::Default,
            })
        } else {
            None
        };
        Ok((global, local))
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Number of hidden-state entries in transformers' `output_hidden_states` convention.
    pub fn num_hidden_entries(&self) -> usize {
        self.num_layers + 1
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
