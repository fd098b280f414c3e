//! Writing Hugging Face checkpoint directories (`convert` of a GGUF file, fine-tuned and aligned
//! models): config.json, model.safetensors (or shards and their index), tokenizer files,
//! generation_config.json — staged beside the destination (`io::atomic::StagedDir`) and moved
//! into place only when complete.

use crate::io::atomic::StagedDir;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Serialises tensors (by Hugging Face name) as one safetensors file in `dtype` (f32, bf16, f16).
pub fn safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    dtype: DType,
    meta: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let st_dtype = match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        other => bail!("cannot write weights as {other:?} (supported: f32, bf16, f16)"),
    };
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let flat: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = match dtype {
            DType::F32 => flat.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => flat
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => flat
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        };
        buffers.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(n, shape, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(st_dtype, shape.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(views, meta)?)
}

/// config.json, tokenizer files and generation_config.json of a GGUF model, as a Hugging Face
/// directory holds them.
pub fn gguf_side_files(
    config: &serde_json::Value,
    tokenizer_json: &serde_json::Value,
    tokenizer_config: &serde_json::Value,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut gen = serde_json::Map::new();
    for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(k) {
            gen.insert(k.into(), v.clone());
        }
    }
    let mut files = BTreeMap::new();
    for (name, v) in [
        ("config.json", config),
        ("tokenizer.json", tokenizer_json),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", &serde_json::Value::Object(gen)),
    ] {
        files.insert(name.to_string(), serde_json::to_vec_pretty(v)?);
    }
    Ok(files)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Writes a Hugging Face checkpoint into `stage`: weights in `dtype` (one model.safetensors, or
/// shards of at most `max_shard_bytes` with model.safetensors.index.json, as save_pretrained
/// does), the side files, and config.json with its dtype field set to `dtype`.
pub fn write_hf_files(
    stage: &StagedDir,
    tensors: &BTreeMap<String, Tensor>,
    dtype: DType,
    side: &BTreeMap<String, Vec<u8>>,
    max_shard_bytes: usize,
) -> Result<()> {
    let elem = if dtype == DType::F32 { 4 } else { 2 };
    let mut shards: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (name, t) in tensors {
        let bytes = t.elem_count() * elem;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(BTreeMap::new());
            size = 0;
        }
        shards
            .last_mut()
            .expect("one shard")
            .insert(name.clone(), t.clone());
        size += bytes;
        total += bytes;
    }
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    if shards.len() == 1 {
        stage.write(
            "model.safetensors",
            &safetensors_bytes(&shards[0], dtype, Some(meta))?,
        )?;
    } else {
        let n = shards.len();
        let mut map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            stage.write(&file, &safetensors_bytes(shard, dtype, Some(meta.clone()))?)?;
            for name in shard.keys() {
                map.insert(name.clone(), serde_json::json!(file));
            }
        }
        stage.write_json(
            "model.safetensors.index.json",
            &serde_json::json!({"metadata": {"total_size": total}, "weight_map": map}),
        )?;
    }
    for (name, bytes) in side {
        if name == "config.json" {
            let mut cfg: serde_json::Value = serde_json::from_slice(bytes)
                .context("config.json of the source model is not valid JSON")?;
            let key = if cfg.get("dtype").is_some() {
                "dtype"
            } else {
                "torch_dtype"
            };
            cfg[key] = serde_json::json!(dtype_name(dtype));
            stage.write_json(name, &cfg)?;
        } else {
            stage.write(name, bytes)?;
        }
    }
    Ok(())
}

/// Converts a GGUF file into a Hugging Face directory that transformers loads.
pub fn convert_gguf(gguf: &Path, out: &Path, dtype: DType) -> Result<()> {
    let g = crate::io::gguf::GgufModel::load(gguf, crate::io::loader::WeightDType::F32)?;
    let stage = StagedDir::new(out)?;
    let side = gguf_side_files(&g.config, &g.tokenizer_json, &g.tokenizer_config)?;
    let tensors: BTreeMap<String, Tensor> = g.weights.into_tensors()?.into_iter().collect();
    write_hf_files(&stage, &tensors, dtype, &side, usize::MAX)?;
    stage.commit()
}
