//! Writing Hugging Face checkpoint directories (`convert` of a GGUF file, fine-tuned and aligned
//! models): config.json, model.safetensors (or shards and their index), tokenizer files,
//! generation_config.json — staged beside the destination (`io::atomic::StagedDir`) and moved
//! into place only when complete.

use crate::io::atomic::StagedDir;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// One tensor's values for `write_safetensors`: a tensor (any device, dtype and layout), or f32
/// values in memory with their shape.
pub enum Values<'a> {
    Tensor(&'a Tensor),
    F32(&'a [f32], Vec<usize>),
}

impl Values<'_> {
    fn shape(&self) -> Vec<usize> {
        match self {
            Values::Tensor(t) => t.dims().to_vec(),
            Values::F32(_, shape) => shape.clone(),
        }
    }

    /// Hands the values to `f` in order, a bounded chunk at a time, without copying a CPU f32
    /// tensor (others are converted one tensor at a time).
    fn for_each_chunk(&self, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        const CHUNK: usize = 1 << 16;
        let t = match self {
            Values::F32(v, _) => return v.chunks(CHUNK).try_for_each(f),
            Values::Tensor(t) => t
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?,
        };
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
            bail!("expected f32 values on the CPU after conversion");
        };
        let start = layout.start_offset();
        v[start..start + t.elem_count()]
            .chunks(CHUNK)
            .try_for_each(f)
    }
}

/// Writes tensors (by Hugging Face name) to `path` as one safetensors file in `dtype` (f32,
/// bf16, f16), converting and writing a chunk at a time: the file's bytes are never held in
/// memory (a fine-tuned model's weights are as large as the model, a checkpoint's optimizer
/// moments twice that, and they would come on top of the training run's own peak).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Values>,
    dtype: DType,
    meta: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    use std::io::Write;
    let st_dtype = match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        other => bail!("cannot write weights as {other:?} (supported: f32, bf16, f16)"),
    };
    let elem = dtype.size_in_bytes();
    let mut header = serde_json::Map::new();
    if let Some(meta) = meta {
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut offset = 0usize;
    for (name, v) in tensors {
        let shape = v.shape();
        let end = offset + shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // Padded with spaces to 8 bytes, as the safetensors library writes it (aligned data).
    head.resize(head.len().next_multiple_of(8), b' ');
    let what = || format!("cannot write {}", path.display());
    let file = std::fs::File::create(path).with_context(what)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(&head))
        .with_context(what)?;
    let mut bytes = Vec::new();
    for v in tensors.values() {
        v.for_each_chunk(&mut |chunk| {
            bytes.clear();
            match dtype {
                DType::F32 => bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes())),
                DType::BF16 => bytes.extend(
                    chunk
                        .iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
                ),
                _ => bytes.extend(
                    chunk
                        .iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes()),
                ),
            }
            w.write_all(&bytes).with_context(what)
        })?;
    }
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(what)?;
    file.sync_data().with_context(what)
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
    let elem = dtype.size_in_bytes();
    let mut shards: Vec<BTreeMap<String, Values>> = vec![BTreeMap::new()];
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
            .insert(name.clone(), Values::Tensor(t));
        size += bytes;
        total += bytes;
    }
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    if shards.len() == 1 {
        let path = stage.path().join("model.safetensors");
        write_safetensors(&path, &shards[0], dtype, Some(meta))?;
    } else {
        let n = shards.len();
        let mut map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            write_safetensors(&stage.path().join(&file), shard, dtype, Some(meta.clone()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every dtype, tensors of several shapes (one longer than a chunk, one not contiguous, one
    /// bf16, one from a slice) and metadata: read back by the safetensors library, the values
    /// are the tensors' own rounded to the file's dtype.
    #[test]
    fn written_files_read_back_with_the_safetensors_library() {
        let dir = std::env::temp_dir().join(format!("sl-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let long: Vec<f32> = (0..70_000).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Tensor::from_vec(long.clone(), (7, 10_000), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(
            vec![1.5f32, -2.25, 3.0, 1e-3, 7.0, -0.1],
            (2, 3),
            &Device::Cpu,
        )
        .unwrap()
        .t()
        .unwrap();
        let c = b.to_dtype(DType::BF16).unwrap();
        let slice = [0.1f32, 0.2, 0.3, 0.4];
        let mut tensors = BTreeMap::new();
        tensors.insert("a.weight".to_string(), Values::Tensor(&a));
        tensors.insert("b".to_string(), Values::Tensor(&b));
        tensors.insert("c".to_string(), Values::Tensor(&c));
        tensors.insert("m.d".to_string(), Values::F32(&slice, vec![2, 2]));
        let want = |name: &str| -> Vec<f32> {
            match name {
                "a.weight" => long.clone(),
                "b" => b.flatten_all().unwrap().to_vec1().unwrap(),
                "c" => c
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                _ => slice.to_vec(),
            }
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let path = dir.join(format!("{dtype:?}.safetensors"));
            let meta = [("format".to_string(), "pt".to_string())].into();
            write_safetensors(&path, &tensors, dtype, Some(meta)).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let (_, info) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(info.metadata().as_ref().unwrap()["format"], "pt");
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.len(), 4);
            for (name, v) in &tensors {
                let view = st.tensor(name).unwrap();
                assert_eq!(view.shape(), v.shape().as_slice(), "{name}");
                let got = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let rounded = Tensor::new(want(name), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(got, rounded, "{name} as {dtype:?}");
            }
        }
        let err = write_safetensors(&dir.join("x"), &tensors, DType::U8, None).unwrap_err();
        assert!(
            err.to_string().contains("cannot write weights as U8"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
