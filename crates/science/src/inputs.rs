//! Models, prompt sets and training data named by a front end (the CLI's flags, the Python
//! package's arguments): a path that exists, or a catalog name. One place, so that both front
//! ends resolve a name the same way and fail with the same message.

use crate::cosine::report::PromptSet;
use crate::finetune::data::{read_records, SftRecord};
use anyhow::{bail, Context, Result};
use sl_catalog::datasets::{self, DataOptions};
use sl_catalog::models::ModelOptions;
use sl_engine::device::DeviceSpec;
use sl_engine::io::loader::WeightDType;
use sl_engine::text::prompts::read_prompts;
use sl_engine::{LoadOptions, Model, PromptRecord};
use std::path::{Path, PathBuf};

/// Where a model comes from and how it is held.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub models: ModelOptions,
    /// `--dtype` (None: the default, `auto`).
    pub dtype: Option<WeightDType>,
    /// `--device` (None: the build's default, see `sl_engine::device::open`).
    pub device: Option<DeviceSpec>,
    /// Tune the allocator around loading (only a process that owns its allocator should; see
    /// `sl_engine::tune_allocator_around`).
    pub tune_malloc: bool,
}

/// A model path, or a catalog name resolved to one (fetched and verified if needed).
pub fn model_path(spec: &Path, models: &ModelOptions) -> Result<PathBuf> {
    let s = spec.to_string_lossy();
    let (p, _) = sl_catalog::models::resolve_model(&s, models)?;
    Ok(p)
}

/// Loads a model onto the device, computing there in the device's dtype (f32 on the CPU); with
/// `training`, in f32 everywhere (the trainer's portable path on a GPU).
pub fn load_model(spec: &Path, src: &ModelSource, training: bool) -> Result<Model> {
    // The device first: a bad device fails before minutes of loading.
    let device = sl_engine::device::open(src.device)?;
    let p = model_path(spec, &src.models)?;
    let opts = LoadOptions {
        tune_malloc: src.tune_malloc,
        dtype: src.dtype.unwrap_or_default(),
    };
    let mut m = Model::load_with(&p, &opts)
        .with_context(|| format!("cannot load model {}", spec.display()))?;
    if training {
        m.to_device_as(&device, candle_core::DType::F32)?;
    } else {
        m.to_device(&device)?;
    }
    Ok(m)
}

/// A prompt set from a file (with an optional column) or a dataset name.
pub fn prompt_set(spec: &str, column: Option<&str>, data: &DataOptions) -> Result<PromptSet> {
    let path = Path::new(spec);
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {spec}"))?;
        return Ok(PromptSet {
            name: spec.to_string(),
            records: read_prompts(path, column)?,
            sha256: crate::sha256_hex(&bytes),
        });
    }
    let Some(ds) = datasets::dataset(spec) else {
        bail!(
            "prompts `{spec}`: no such file, and {}",
            datasets::unknown(spec)
        );
    };
    if column.is_some() {
        bail!("--column applies to prompt files, not to the dataset `{spec}`");
    }
    let files = datasets::resolve(&ds, data)?;
    let records = datasets::read_prompts(&ds, &files)?
        .into_iter()
        .map(|(instruction, input)| PromptRecord { instruction, input })
        .collect::<Vec<_>>();
    if records.is_empty() {
        bail!("dataset `{spec}` holds no prompts");
    }
    let sha = files
        .iter()
        .map(|f| f.sha256.as_str())
        .collect::<Vec<_>>()
        .join("+");
    Ok(PromptSet {
        name: spec.to_string(),
        records,
        sha256: sha,
    })
}

/// The file of a single-file dataset, resolved and verified: `(path, sha256)`; None when `spec`
/// is not a dataset name.
pub fn dataset_file(spec: &str, data: &DataOptions) -> Result<Option<(PathBuf, String)>> {
    let Some(ds) = datasets::dataset(spec) else {
        return Ok(None);
    };
    let files = datasets::resolve(&ds, data)?;
    let [file] = files.as_slice() else {
        bail!("dataset `{spec}` is not a single training file")
    };
    Ok(Some((file.path.clone(), file.sha256.clone())))
}

/// Training records from a file or a dataset name, with a description for provenance.
pub fn training_data(spec: &str, data: &DataOptions) -> Result<(Vec<SftRecord>, String)> {
    let path = Path::new(spec);
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {spec}"))?;
        return Ok((
            read_records(path)?,
            format!("{spec} (sha256 {})", crate::sha256_hex(&bytes)),
        ));
    }
    let Some((path, sha)) = dataset_file(spec, data)? else {
        bail!(
            "--data `{spec}`: no such file, and {}",
            datasets::unknown(spec)
        );
    };
    Ok((read_records(&path)?, format!("{spec} (sha256 {sha})")))
}

/// Formats and tokenises `records`, refusing a prompt longer than the model's context (naming
/// `source`, where the prompts came from, and the prompt).
pub fn encode_prompts(
    model: &Model,
    records: &[PromptRecord],
    template: sl_engine::Template,
    source: &str,
) -> Result<Vec<sl_engine::Prompt>> {
    let prompts = model.prompts(records, template)?;
    let max = model.cfg().max_position_embeddings;
    if let Some(p) = prompts.iter().find(|p| p.ids.len() > max) {
        bail!(
            "{source}: prompt {:?} is {} tokens, longer than the model's context ({max})",
            p.record.instruction,
            p.ids.len()
        );
    }
    Ok(prompts)
}

/// What `inspect --json` prints about a loaded model (`spec` as it was named).
pub fn describe_model(m: &Model, spec: &str) -> Result<serde_json::Value> {
    let c = m.cfg();
    // A GGUF file's own precision is its tensors' types (source_dtype is what a converted copy
    // would be written as, f32, which says nothing about the file).
    let gguf_types = if m
        .source
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        Some(sl_engine::io::gguf::tensor_types(&m.source)?)
    } else {
        None
    };
    let on_disk = match &gguf_types {
        Some(t) => {
            let parts: Vec<String> = t.iter().map(|(k, n)| format!("{k} x {n}")).collect();
            format!("GGUF {}", parts.join(", "))
        }
        None => m.source_dtype.as_str().to_string(),
    };
    Ok(serde_json::json!({
        "model": spec,
        "family": c.family,
        "architecture": c.architecture,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "parameters": m.num_parameters(),
        "storage_dtype": m.source_dtype.as_str(),
        "storage": on_disk,
        "gguf_tensor_types": gguf_types
            .as_ref()
            .map(|t| t.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()),
        "dtype_option": m.dtype_choice.as_str(),
        "weights_in_memory": m.weight_storage,
        "weight_bytes": m.decoder.weight_bytes(),
        "compute_dtype": crate::schema::Precision::of(m).activations,
        "device": sl_engine::device::name(&m.decoder.device),
        "tied_embeddings": c.tie_word_embeddings,
        "sliding_window": c.sliding_window,
        "sliding_layers": c.layer_types.iter()
            .filter(|k| **k == sl_engine::io::config::AttentionKind::Sliding)
            .count(),
        "rope": c.rope,
        "chat_template": m.tokenizer.chat_template.is_some(),
        "eos_token_ids": m.eos_token_ids,
        "load_seconds": m.load_seconds,
    }))
}
