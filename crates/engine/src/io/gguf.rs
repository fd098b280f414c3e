//! GGUF files (llama.cpp, Ollama, LM Studio) as a model source.
//!
//! Everything is mapped onto what a Hugging Face directory holds, so one loader serves both:
//! metadata becomes a `config.json` value, tensors get their Hugging Face names (kept quantized,
//! or dequantised; llama.cpp's q/k row permutation undone, Gemma's +1 on norms undone), and the vocabulary
//! becomes a `tokenizer.json` value plus a `tokenizer_config.json` value with the chat template.
//! `convert` writes those values to disk unchanged.

use crate::io::config::ModelConfig;
use crate::io::loader::WeightDType;
use crate::io::weights::WeightMap;
use crate::model::layout::{Layout, Part, Slot, EMBED, FINAL_NORM, LM_HEAD};
use crate::model::weight::{quant_name, Block};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A GGUF file translated into Hugging Face terms.
pub struct GgufModel {
    pub config: Value,
    pub weights: WeightMap,
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub architecture: String,
    /// How many tensors of each ggml storage type the file holds.
    pub tensor_types: std::collections::BTreeMap<String, usize>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a GValue> {
    c.metadata.get(key)
}

fn meta_u64(c: &Content, key: &str) -> Option<u64> {
    meta(c, key).and_then(|v| {
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().map(|x| x as u64))
    })
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    meta(c, key).and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    meta(c, key)
        .and_then(|v| v.to_string().ok())
        .map(|s| s.as_str())
}

fn meta_strings(c: &Content, key: &str) -> Result<Vec<String>> {
    let v = meta(c, key).ok_or_else(|| anyhow!("metadata `{key}` is missing"))?;
    v.to_vec()
        .map_err(|e| anyhow!("metadata `{key}`: {e}"))?
        .iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| anyhow!("metadata `{key}`: {e}"))
        })
        .collect()
}

fn meta_ints(c: &Content, key: &str) -> Result<Vec<i64>> {
    match meta(c, key) {
        None => Ok(vec![]),
        Some(v) => v
            .to_vec()
            .map_err(|e| anyhow!("metadata `{key}`: {e}"))?
            .iter()
            .map(|x| {
                x.to_i32()
                    .map(i64::from)
                    .or_else(|_| x.to_u32().map(i64::from))
                    .map_err(|e| anyhow!("metadata `{key}`: {e}"))
            })
            .collect(),
    }
}

/// The `general.architecture` values we map, with the Hugging Face architecture of each.
fn hf_architecture(arch: &str) -> Option<(&'static str, &'static str)> {
    Some(match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "mistral" => ("MistralForCausalLM", "mistral"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
        "gemma" => ("GemmaForCausalLM", "gemma"),
        "gemma2" => ("Gemma2ForCausalLM", "gemma2"),
        "gemma3" => ("Gemma3ForCausalLM", "gemma3_text"),
        "phi3" => ("Phi3ForCausalLM", "phi3"),
        _ => return None,
    })
}

/// llama.cpp's name of a layer tensor: the slot of our decoder it fills and, when it is one piece
/// of a fused slot, which piece (None: the whole slot, stored fused).
fn llama_cpp_slot(arch: &str, part: &str) -> Option<(Slot, Option<usize>)> {
    Some(match part {
        "attn_norm" => (Slot::AttnInNorm, Some(0)),
        "post_attention_norm" => (Slot::AttnOutNorm, Some(0)),
        "ffn_norm" => (Slot::MlpInNorm, Some(0)),
        "post_ffw_norm" => (Slot::MlpOutNorm, Some(0)),
        "attn_q" => (Slot::Qkv, Some(0)),
        "attn_k" => (Slot::Qkv, Some(1)),
        "attn_v" => (Slot::Qkv, Some(2)),
        "attn_qkv" => (Slot::Qkv, None),
        "attn_output" => (Slot::O, Some(0)),
        "attn_q_norm" => (Slot::QNorm, Some(0)),
        "attn_k_norm" => (Slot::KNorm, Some(0)),
        "ffn_gate" => (Slot::GateUp, Some(0)),
        "ffn_up" if arch == "phi3" => (Slot::GateUp, None),
        "ffn_up" => (Slot::GateUp, Some(1)),
        "ffn_down" => (Slot::Down, Some(0)),
        _ => return None,
    })
}

/// llama.cpp tensor names to Hugging Face ones, the latter from the layout table (`split` holds
/// one tensor per projection, `fused` the fused slots).
fn hf_name(arch: &str, split: &Layout, fused: &Layout, name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some(EMBED.into()),
        "output_norm.weight" => return Some(FINAL_NORM.into()),
        "output.weight" => return Some(LM_HEAD.into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, suffix) = tail.rsplit_once('.')?;
    let (slot, piece) = llama_cpp_slot(arch, part)?;
    // The weight's entry names the piece; the bias takes the same name (whether the config
    // expects one is the loader's question).
    let hf = match piece {
        _ if !slot.is_matrix() => fused.slot_suffix(slot),
        Some(k) => split.entry(slot, k, Part::Weight)?.suffix,
        None => fused.entry(slot, 0, Part::Weight)?.suffix,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's `permute` of q/k rows (its rope layout): rows grouped per head as
/// (head, 2, dim/2) were written as (head, dim/2, 2). Quantized rows move as whole bytes.
pub fn unpermute_rows(w: &Block, n_head: usize) -> Result<Block> {
    let rows = w.dims()[0];
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("{rows} rows do not split into {n_head} heads of pairs of rows");
    }
    let half = rows / n_head / 2;
    // Row (h, two, i) of the result is row (h, i, two) of the file.
    w.permute_rows(|r| {
        let (h, rest) = (r / (2 * half), r % (2 * half));
        let (two, i) = (rest / half, rest % half);
        h * 2 * half + i * 2 + two
    })
}

impl GgufModel {
    /// Reads a GGUF file, holding its matrices as `dtype` says (`WeightDType::target` of the
    /// file's value count): quantized ones kept quantized (f16/bf16 ones as they are), or every
    /// matrix dequantized to one dtype. Vectors (norms, biases) are always f32.
    pub fn load(path: &Path, dtype: WeightDType) -> Result<GgufModel> {
        let shown = path.display().to_string();
        crate::io::gguf_check::check(path)?;
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
        let content = Content::read(&mut f)
            .map_err(|e| anyhow!("{shown}: not a readable GGUF file ({e})"))?;
        let values = content
            .tensor_infos
            .values()
            .map(|i| i.shape.elem_count())
            .sum();
        let target = dtype.target(values);
        let arch = meta_str(&content, "general.architecture")
            .ok_or_else(|| anyhow!("{shown}: metadata `general.architecture` is missing"))?
            .to_string();
        let Some((hf_arch, model_type)) = hf_architecture(&arch) else {
            bail!(
                "{shown}: GGUF architecture `{arch}` is not supported (supported: llama, mistral, \
                 qwen2, qwen3, gemma, gemma2, gemma3, phi3)"
            );
        };
        let config = Self::config(&content, &arch, hf_arch, model_type, &shown)?;
        let cfg = ModelConfig::from_json(&config, &shown)?;
        let (split, fused) = (Layout::split(&cfg), Layout::fused(&cfg));
        let n_head = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
        let n_kv = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
        let mut tensors = HashMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut quant_types = std::collections::BTreeMap::new();
        for name in names {
            let Some(hf) = hf_name(&arch, &split, &fused, name) else {
                if name.starts_with("rope_") {
                    continue; // llama.cpp's precomputed rope factors; the config carries them
                }
                bail!(
                    "{shown}: tensor `{name}` has no Hugging Face counterpart for architecture \
                     `{arch}`"
                );
            };
            let info = &content.tensor_infos[name];
            *quant_types
                .entry(format!("{:?}", info.ggml_dtype))
                .or_insert(0usize) += 1;
            let q = content.tensor(&mut f, name, &Device::Cpu).map_err(|e| {
                anyhow!("{shown}: cannot read tensor `{name}` ({e}); is the file truncated?")
            })?;
            let this = || format!("{shown}: tensor `{name}`");
            let keep = target.is_none() && q.rank() == 2;
            let mut b = match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    Block::Dense(q.dequantize(&Device::Cpu).with_context(this)?)
                }
                t if keep && crate::kernels::quant::supported(t) => Block::Quant(Arc::new(q)),
                t if keep => bail!(
                    "{shown}: tensor `{name}` is stored as {}, which the quantized kernels cannot \
                     run; load with --dtype f32 to dequantize it",
                    quant_name(t)
                ),
                _ => Block::Dense(q.dequantize(&Device::Cpu).with_context(this)?),
            };
            if matches!(arch.as_str(), "llama" | "mistral") && b.dims().len() == 2 {
                if name.contains(".attn_q.") {
                    b = unpermute_rows(&b, n_head).with_context(this)?;
                } else if name.contains(".attn_k.") {
                    b = unpermute_rows(&b, n_kv).with_context(this)?;
                }
            }
            if !keep || b.dims().len() == 1 {
                let mut t = b.to_f32().with_context(this)?;
                if arch.starts_with("gemma") && name.ends_with("norm.weight") {
                    t = (t - 1.0).with_context(this)?; // llama.cpp stores Gemma's (1 + w)
                }
                if let Some(dt) = target.filter(|_| t.rank() == 2) {
                    t = crate::io::weights::convert_checked(&t, dt).with_context(this)?;
                }
                b = Block::Dense(t);
            }
            tensors.insert(hf, b);
        }
        let (tokenizer_json, tokenizer_config) = crate::io::gguf_vocab::build(&content, &shown)?;
        Ok(GgufModel {
            config,
            // Writers of a GGUF-sourced model write f32 unless told otherwise.
            weights: WeightMap::new(tensors, DType::F32, shown),
            tokenizer_json,
            tokenizer_config,
            architecture: arch,
            tensor_types: quant_types,
        })
    }

    fn config(
        c: &Content,
        arch: &str,
        hf_arch: &str,
        model_type: &str,
        shown: &str,
    ) -> Result<Value> {
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| -> Result<u64> {
            meta_u64(c, &key(k)).ok_or_else(|| anyhow!("{shown}: metadata `{}` is missing", key(k)))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let vocab = match meta_u64(c, &key("vocab_size")) {
            Some(v) => v,
            None => meta(c, "tokenizer.ggml.tokens")
                .and_then(|t| t.to_vec().ok())
                .map(|t| t.len() as u64)
                .ok_or_else(|| {
                    anyhow!(
                    "{shown}: neither `{}` nor `tokenizer.ggml.tokens` gives the vocabulary size",
                    key("vocab_size")
                )
                })?,
        };
        let head_dim = meta_u64(c, &key("attention.key_length")).unwrap_or(hidden / heads.max(1));
        let mut cfg = Map::new();
        cfg.insert("architectures".into(), json!([hf_arch]));
        cfg.insert("model_type".into(), json!(model_type));
        cfg.insert("hidden_size".into(), json!(hidden));
        cfg.insert(
            "intermediate_size".into(),
            json!(need("feed_forward_length")?),
        );
        cfg.insert("num_hidden_layers".into(), json!(need("block_count")?));
        cfg.insert("num_attention_heads".into(), json!(heads));
        cfg.insert(
            "num_key_value_heads".into(),
            json!(meta_u64(c, &key("attention.head_count_kv")).unwrap_or(heads)),
        );
        cfg.insert("head_dim".into(), json!(head_dim));
        cfg.insert("vocab_size".into(), json!(vocab));
        cfg.insert(
            "max_position_embeddings".into(),
            json!(meta_u64(c, &key("context_length")).unwrap_or(4096)),
        );
        cfg.insert(
            "rms_norm_eps".into(),
            json!(meta_f64(c, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6)),
        );
        cfg.insert(
            "tie_word_embeddings".into(),
            json!(!c.tensor_infos.contains_key("output.weight")),
        );
        let mut rope = Map::new();
        rope.insert("rope_type".into(), json!("default"));
        rope.insert(
            "rope_theta".into(),
            json!(meta_f64(c, &key("rope.freq_base")).unwrap_or(10_000.0)),
        );
        match meta_str(c, &key("rope.scaling.type")) {
            None | Some("none") => {}
            Some("linear") => {
                rope.insert("rope_type".into(), json!("linear"));
                rope.insert(
                    "factor".into(),
                    json!(meta_f64(c, &key("rope.scaling.factor")).unwrap_or(1.0)),
                );
            }
            Some(other) => {
                bail!("{shown}: rope scaling `{other}` in GGUF metadata is not supported")
            }
        }
        if let Some(rot) = meta_u64(c, &key("rope.dimension_count")) {
            if rot != head_dim {
                cfg.insert(
                    "partial_rotary_factor".into(),
                    json!(rot as f64 / head_dim as f64),
                );
            }
        }
        if let Some(w) = meta_u64(c, &key("attention.sliding_window")) {
            cfg.insert("sliding_window".into(), json!(w));
        }
        if let Some(s) = meta_f64(c, &key("attn_logit_softcapping")) {
            cfg.insert("attn_logit_softcapping".into(), json!(s));
        }
        if let Some(s) = meta_f64(c, &key("final_logit_softcapping")) {
            cfg.insert("final_logit_softcapping".into(), json!(s));
        }
        if arch == "gemma3" {
            cfg.insert("rope_local_base_freq".into(), json!(10_000.0));
        }
        cfg.insert("rope_theta".into(), rope["rope_theta"].clone());
        if rope["rope_type"] != "default" {
            cfg.insert("rope_scaling".into(), Value::Object(rope));
        }
        for (hf, g) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = meta_u64(c, g) {
                cfg.insert(hf.into(), json!(id));
            }
        }
        // llama.cpp also ends generation at the end-of-turn token (Llama-3's <|eot_id|>), which
        // transformers lists beside eos in generation_config.json.
        let eos = meta_u64(c, "tokenizer.ggml.eos_token_id");
        if let Some(eot) = meta_u64(c, "tokenizer.ggml.eot_token_id").filter(|t| Some(*t) != eos) {
            let ids: Vec<u64> = eos.into_iter().chain([eot]).collect();
            cfg.insert("eos_token_id".into(), json!(ids));
        }
        Ok(Value::Object(cfg))
    }
}

pub(crate) fn gguf_strings(c: &Content, key: &str) -> Result<Vec<String>> {
    meta_strings(c, key)
}

pub(crate) fn gguf_ints(c: &Content, key: &str) -> Result<Vec<i64>> {
    meta_ints(c, key)
}

pub(crate) fn gguf_u64(c: &Content, key: &str) -> Option<u64> {
    meta_u64(c, key)
}

pub(crate) fn gguf_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    meta_str(c, key)
}

pub(crate) fn gguf_bool(c: &Content, key: &str) -> Option<bool> {
    meta(c, key).and_then(|v| v.to_bool().ok())
}

/// The `config.json` value of a GGUF file from its header alone: no tensor is read or
/// dequantised, so a multi-gigabyte file answers at once (for commands that need only the shape).
pub fn read_config(path: &Path) -> Result<Value> {
    let shown = path.display().to_string();
    crate::io::gguf_check::check(path)?;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let content =
        Content::read(&mut f).map_err(|e| anyhow!("{shown}: not a readable GGUF file ({e})"))?;
    let arch = meta_str(&content, "general.architecture")
        .ok_or_else(|| anyhow!("{shown}: metadata `general.architecture` is missing"))?;
    let Some((hf_arch, model_type)) = hf_architecture(arch) else {
        bail!(
            "{shown}: GGUF architecture `{arch}` is not supported (supported: llama, mistral, \
             qwen2, qwen3, gemma, gemma2, gemma3, phi3)"
        );
    };
    GgufModel::config(&content, arch, hf_arch, model_type, &shown)
}

/// How many tensors of each ggml storage type the file holds (`Q4_1`, `Q6_K`, `F32`), from the
/// header alone, most frequent first: what `inspect` shows as the file's precision.
pub fn tensor_types(path: &Path) -> Result<Vec<(String, usize)>> {
    let shown = path.display().to_string();
    crate::io::gguf_check::check(path)?;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let content =
        Content::read(&mut f).map_err(|e| anyhow!("{shown}: not a readable GGUF file ({e})"))?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for info in content.tensor_infos.values() {
        *counts.entry(quant_name(info.ggml_dtype)).or_insert(0) += 1;
    }
    let mut out: Vec<(String, usize)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}
