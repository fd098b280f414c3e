//! Reading checkpoint tensors into candle tensors, in their storage dtype or converted.
//!
//! Safetensors files are memory-mapped and copied one tensor at a time; the pages of a tensor
//! are released right after its copy so that the loaded copy is the only one resident.

use crate::model::weight::Block;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// All tensors of a checkpoint, by their Hugging Face name, as loaded (dense in the chosen
/// dtype, or GGUF-quantized).
pub struct WeightMap {
    tensors: HashMap<String, Block>,
    /// Storage dtype of the checkpoint as found on disk (the most common one).
    pub source_dtype: DType,
    /// Where the tensors came from, for error messages.
    pub origin: String,
}

impl WeightMap {
    pub fn new(tensors: HashMap<String, Block>, source_dtype: DType, origin: String) -> Self {
        WeightMap {
            tensors,
            source_dtype,
            origin,
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor out of the map (so it is not kept twice) and checks its shape.
    pub fn take(&mut self, name: &str, shape: &[usize], why: &str) -> Result<Block> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.origin))?;
        if t.dims() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?} but the config implies {:?} ({why})",
                self.origin,
                t.dims(),
                shape
            );
        }
        Ok(t)
    }

    pub fn take_opt(&mut self, name: &str, shape: &[usize], why: &str) -> Result<Option<Block>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape, why).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Every tensor in f32 (dequantized or widened), for writers.
    pub fn into_tensors(self) -> Result<HashMap<String, Tensor>> {
        self.tensors
            .into_iter()
            .map(|(k, b)| Ok((k, b.to_f32()?)))
            .collect()
    }

    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}

/// The safetensors files of a Hugging Face directory: `model.safetensors`, or the shards listed
/// by `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: missing object field `weight_map`", index.display()))?;
        let mut files: Vec<String> = map
            .iter()
            .map(|(tensor, f)| {
                let f = f.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map entry `{tensor}`: non-string shard name {f}",
                        index.display()
                    )
                })?;
                // A shard is a file beside the index: a path out of the directory (`../x`,
                // `/etc/x`) would read whatever the index points at.
                let plain = !f.is_empty() && f != "." && f != ".." && !f.contains(['/', '\\']);
                if !plain {
                    bail!(
                        "{}: weight_map entry `{tensor}`: shard `{f}` is not a file name in the \
                         model directory",
                        index.display()
                    );
                }
                Ok(f.to_string())
            })
            .collect::<Result<_>>()?;
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(&f);
            if !p.exists() {
                bail!(
                    "{}: shard `{f}` named in weight_map does not exist ({})",
                    index.display(),
                    p.display()
                );
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints \
         are read; convert .bin files with transformers first)",
        dir.display()
    )
}

/// A safetensors tensor as a CPU tensor of dtype `target` (None: its own dtype, f64 narrowed to
/// f32), and the dtype it had on disk.
fn to_tensor(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    file: &Path,
    target: Option<DType>,
) -> Result<(Tensor, DType)> {
    use safetensors::Dtype as S;
    let dt = match view.dtype() {
        S::F32 => DType::F32,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::F64 => DType::F64,
        other => bail!(
            "{}: tensor `{name}` has dtype {other:?}; supported: F32, BF16, F16, F64",
            file.display()
        ),
    };
    // Little-endian bytes, copied out of the mapping (candle handles their alignment).
    let t = Tensor::from_raw_buffer(view.data(), dt, view.shape(), &Device::Cpu)?;
    let t = if dt == DType::F64 {
        t.to_dtype(DType::F32)?
    } else {
        t
    };
    let t = match target {
        Some(want) if want != t.dtype() => convert_checked(&t, want)
            .with_context(|| format!("{}: tensor `{name}`", file.display()))?,
        _ => t,
    };
    Ok((t, dt))
}

/// `t` in dtype `want`, refusing a conversion that loses values outright: f16 holds magnitudes
/// up to 65504 only, and a bf16 or f32 checkpoint may hold larger ones (they would become inf).
pub fn convert_checked(t: &Tensor, want: DType) -> Result<Tensor> {
    if want == DType::F16 && t.dtype() != DType::F16 && t.elem_count() > 0 {
        let max = t
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if max > 65504.0 {
            bail!(
                "holds a value of magnitude {max}, beyond f16's range (65504): this model cannot \
                 be held in f16; use --dtype bf16 or f32"
            );
        }
    }
    Ok(t.to_dtype(want)?)
}

/// How many values the safetensors files hold (headers only), to choose a dtype before loading.
pub fn count_values(files: &[PathBuf]) -> Result<usize> {
    let mut n = 0;
    for file in files {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        check_header_length(&f, file)?;
        // SAFETY: as in `load_safetensors`; only the header is read.
        let mmap = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("cannot map {}", file.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file ({e}); is it truncated?",
                file.display()
            )
        })?;
        n += meta
            .tensors()
            .values()
            .map(|i| i.shape.iter().product::<usize>())
            .sum::<usize>();
    }
    Ok(n)
}

/// Checks the 8-byte header length of a safetensors file against the file's length before the
/// file is mapped (an empty file cannot be mapped, and a short one has no header to parse).
fn check_header_length(f: &std::fs::File, file: &Path) -> Result<()> {
    use std::io::Read;
    let len = f
        .metadata()
        .with_context(|| format!("cannot stat {}", file.display()))?
        .len();
    let mut n = [0u8; 8];
    if len < 8 {
        bail!(
            "{}: not a safetensors file: {len} bytes, shorter than the 8-byte header length",
            file.display()
        );
    }
    (&*f)
        .read_exact(&mut n)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let n = u64::from_le_bytes(n);
    if n > len - 8 {
        bail!(
            "{}: header length {n} is past the end of the file ({len} bytes)",
            file.display()
        );
    }
    Ok(())
}

/// Loads every tensor of the given safetensors files, converted to `target` (None: each in its
/// own dtype, f64 as f32).
pub fn load_safetensors(
    files: &[PathBuf],
    origin: &str,
    target: Option<DType>,
) -> Result<WeightMap> {
    let mut tensors = HashMap::new();
    let mut dtype_counts: BTreeMap<&'static str, (usize, DType)> = BTreeMap::new();
    for file in files {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        check_header_length(&f, file)?;
        // SAFETY: memmap2 maps the file shared and read-only (PROT_READ, MAP_SHARED); we never
        // write through it and the mapping lives only for this loop. Another process can still
        // change the file under us, as with any mmap reader: a concurrent write changes the bytes
        // we read (wrong numbers), and a file truncated while mapped raises SIGBUS (the process
        // dies) when a page past its new end is touched. Both are outside our control.
        let mmap = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("cannot map {}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file ({e}); is it truncated?",
                file.display()
            )
        })?;
        let base = mmap.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let (t, dt) = to_tensor(&view, &name, file, target)?;
            let e = dtype_counts.entry(dt.as_str()).or_insert((0, dt));
            e.0 += 1;
            release_pages(
                &mmap,
                view.data().as_ptr() as usize - base,
                view.data().len(),
            );
            if tensors.insert(name.clone(), Block::Dense(t)).is_some() {
                bail!(
                    "{}: tensor `{name}` appears in more than one shard",
                    file.display()
                );
            }
        }
    }
    let source_dtype = dtype_counts
        .values()
        .max_by_key(|(n, _)| *n)
        .map(|(_, d)| *d)
        .unwrap_or(DType::F32);
    Ok(WeightMap::new(tensors, source_dtype, origin.to_string()))
}

/// Drops the resident pages of a converted tensor so the mapped copy does not add to RSS.
fn release_pages(mmap: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        let page = 4096;
        let start = offset.div_ceil(page) * page;
        let end = (offset + len) / page * page;
        if end > start {
            // SAFETY: DontNeed on a read-only shared file mapping only unmaps these pages from
            // this process (the page cache keeps the file's data); they are read from the file
            // again if touched, which we do not do.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_refuses_values_beyond_its_range_and_other_dtypes_pass() {
        let big = Tensor::new(&[1.0f32, -70000.0], &Device::Cpu).unwrap();
        let e = convert_checked(&big, DType::F16).unwrap_err().to_string();
        assert!(e.contains("65504") && e.contains("--dtype bf16"), "{e}");
        assert_eq!(
            convert_checked(&big, DType::BF16).unwrap().dtype(),
            DType::BF16
        );
        let fine = Tensor::new(&[1.0f32, -65504.0], &Device::Cpu).unwrap();
        let h = convert_checked(&fine, DType::F16).unwrap();
        assert_eq!(
            h.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, -65504.0]
        );
    }
}
