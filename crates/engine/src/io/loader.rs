//! A loaded model: decoder, tokenizer, generation settings and where they came from.

use crate::io::config::{token_id_list, ModelConfig};
use crate::io::weights::{self, WeightMap};
use crate::model::Decoder;
use crate::text::prompts::{PromptRecord, Template};
use crate::text::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// Generation stops on any of these (generation_config.json, else config.json, else the
    /// tokenizer's eos token).
    pub eos_token_ids: Vec<u32>,
    pub source: PathBuf,
    pub source_dtype: DType,
    /// What `--dtype` asked for, and the storage the projections ended up in (`f32`, `bf16`,
    /// `Q4_K+Q6_K`); activations are f32 whatever the storage.
    pub dtype_choice: WeightDType,
    pub weight_storage: String,
    pub load_seconds: f64,
    /// The non-weight files of a Hugging Face directory for this model (config.json, tokenizer
    /// files, chat template, generation_config.json), so that a fine-tuned copy can be written.
    pub hf_files: BTreeMap<String, Vec<u8>>,
}

/// The files besides weights that a Hugging Face directory carries and a copy keeps.
const HF_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// A formatted, tokenised prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub record: PromptRecord,
    pub text: String,
    pub ids: Vec<u32>,
}

impl AsRef<[u32]> for Prompt {
    fn as_ref(&self) -> &[u32] {
        &self.ids
    }
}

/// The precision weights are held in (`--dtype`). Activations and accumulation are f32 always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    /// The checkpoint's own storage for models of 1B parameters and more, f32 below.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    /// The checkpoint's own storage (bf16/f16 safetensors, quantized GGUF) at any size.
    Native,
}

/// Models this large keep their storage precision under `auto`.
pub const AUTO_NATIVE_FROM: usize = 1_000_000_000;

impl WeightDType {
    /// For `--help`.
    pub const HELP: &'static str = "Weight precision: auto (the checkpoint's own storage for \
        models of 1B parameters and more, f32 below), f32, bf16, f16, or native (the checkpoint's \
        own storage at any size: bf16/f16 safetensors stay so, GGUF stays quantized). \
        Activations are f32 in every case";

    pub fn as_str(self) -> &'static str {
        match self {
            WeightDType::Auto => "auto",
            WeightDType::F32 => "f32",
            WeightDType::Bf16 => "bf16",
            WeightDType::F16 => "f16",
            WeightDType::Native => "native",
        }
    }

    /// None: keep each tensor's storage; Some: convert every matrix to that dtype.
    pub fn target(self, values: usize) -> Option<DType> {
        match self {
            WeightDType::F32 => Some(DType::F32),
            WeightDType::Bf16 => Some(DType::BF16),
            WeightDType::F16 => Some(DType::F16),
            WeightDType::Native => None,
            WeightDType::Auto if values >= AUTO_NATIVE_FROM => None,
            WeightDType::Auto => Some(DType::F32),
        }
    }
}

impl std::str::FromStr for WeightDType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => WeightDType::Auto,
            "f32" | "float32" => WeightDType::F32,
            "bf16" | "bfloat16" => WeightDType::Bf16,
            "f16" | "float16" => WeightDType::F16,
            "native" => WeightDType::Native,
            _ => bail!("--dtype `{s}`: expected auto, f32, bf16, f16 or native"),
        })
    }
}

impl std::fmt::Display for WeightDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How `Model::load_with` loads.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The precision weights are held in.
    pub dtype: WeightDType,
    /// Tune glibc's allocator for the load and for the inference after it (see
    /// [`tune_allocator_around`]). This changes process-wide allocator settings, so it is off
    /// unless the caller — the `safety-layers` binary, or a program that owns its process —
    /// asks for it.
    pub tune_malloc: bool,
}

/// Runs `load` with glibc's mmap threshold pinned at 128 KiB, then sets it to 32 MiB (a no-op
/// on other platforms). Process-wide: only for programs that own their allocator settings.
///
/// Loading converts and fuses tensors, freeing the unfused halves; under glibc's dynamic
/// threshold those freed blocks stay resident as heap holes, which put the peak RSS of a whole
/// `cosine` run at 1.30x the f32 weights (bench/RESULTS.md). With every large block mapped on its
/// own, a free returns it at once. Afterwards large temporaries should stay in the heap for reuse
/// (mapping each one anew costs a page fault per page), which is what the higher threshold does.
pub fn tune_allocator_around<R>(load: impl FnOnce() -> R) -> R {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let out = load();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        // Pinning the threshold also pins the trim threshold at 128 KiB: the heap top would be
        // returned and faulted back in around every large temporary (30% slower `hidden`).
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024 * 1024);
    }
    out
}

/// Allocator settings for a training process (glibc; a no-op elsewhere), after loading: every
/// block comes from the heap and the heap is never trimmed, so the buffers of one step (all
/// freed when its backward pass ends) are reused by the next instead of being mapped and zeroed
/// afresh. A step's shapes repeat, so the heap stops growing after the first step; the peak RSS
/// is the first step's. Process-wide: only for programs that own their allocator settings.
pub fn tune_allocator_for_training() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// One glibc malloc arena for the whole process (glibc; a no-op elsewhere), set first thing
/// while the process has one thread. glibc gives each thread that allocates its own arena, and
/// a buffer freed in one is not reused by an allocation in another: with rayon's threads
/// allocating and freeing a training step's buffers, the free space piled up in several arenas.
/// One arena took `finetune`'s peak RSS (SmolLM2-135M, batch 4 x 128, 10 steps, Intel Xeon, 2
/// cores) from 3332-3410 MiB to 2973-2998 MiB at the same tokens/s (bench/RESULTS.md). Our
/// allocations are large tensors, never per element, so the one lock is not contended. An
/// explicit MALLOC_ARENA_MAX still wins (glibc read it at start-up). Process-wide: only for
/// programs that own their allocator settings.
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; any value is valid.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

impl Model {
    /// Loads a Hugging Face checkpoint directory or a GGUF file, leaving the process's allocator
    /// settings alone.
    ///
    /// ```no_run
    /// # fn main() -> anyhow::Result<()> {
    /// use std::path::Path;
    /// let model = sl_engine::Model::load(Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    /// println!("{:?}, {} layers", model.cfg().family, model.cfg().num_layers);
    /// # Ok(())
    /// # }
    /// ```
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_with(path, &LoadOptions::default())
    }

    /// As `load`, with options (the CLI tunes the allocator; `tune_allocator_around` says why).
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
        if opts.tune_malloc {
            tune_allocator_around(|| Model::load_inner(path, opts.dtype))
        } else {
            Model::load_inner(path, opts.dtype)
        }
    }

    /// Moves the model to `device`; on a GPU it computes in the `--dtype` asked for, else in
    /// `Decoder::gpu_compute_dtype` (bf16 for bf16 checkpoints and for models of 1B parameters
    /// and more, else f32).
    pub fn to_device(&mut self, device: &candle_core::Device) -> Result<()> {
        // An explicit --dtype decides; auto and native follow the size and storage rule.
        let dtype = match self.dtype_choice {
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
            WeightDType::Auto | WeightDType::Native => self.decoder.gpu_compute_dtype(),
        };
        self.to_device_as(device, dtype)
    }

    /// As `to_device`, computing in `dtype` there (training: f32). Nothing changes on the CPU.
    pub fn to_device_as(&mut self, device: &candle_core::Device, dtype: DType) -> Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        self.decoder.to_device(device, dtype).with_context(|| {
            format!(
                "cannot move the model to {} in {dtype:?}",
                crate::device::name(device)
            )
        })?;
        self.weight_storage = self.decoder.weight_storage();
        Ok(())
    }

    fn load_inner(path: &Path, dtype: WeightDType) -> Result<Model> {
        let t0 = std::time::Instant::now();
        if !path.exists() {
            bail!("model {}: no such file or directory", path.display());
        }
        if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            let mut m = Model::load_gguf(path, dtype)?;
            m.load_seconds = t0.elapsed().as_secs_f64();
            return Ok(m);
        }
        if !path.is_dir() {
            bail!(
                "model {}: expected a Hugging Face checkpoint directory or a .gguf file",
                path.display()
            );
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            bail!("{}: config.json is missing", path.display());
        }
        let cfg = ModelConfig::from_file(&cfg_path)?;
        let tokenizer = Tokenizer::from_dir(path)?;
        let files = weights::safetensors_files(path)?;
        let target = dtype.target(weights::count_values(&files)?);
        let w = weights::load_safetensors(&files, &path.display().to_string(), target)?;
        let gen_path = path.join("generation_config.json");
        let eos = if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path)
                .with_context(|| format!("cannot read {}", gen_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", gen_path.display()))?;
            token_id_list(v.get("eos_token_id"))
        } else {
            vec![]
        };
        let mut hf_files = BTreeMap::new();
        for name in HF_SIDE_FILES {
            let p = path.join(name);
            if p.is_file() {
                hf_files.insert(
                    name.to_string(),
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
                );
            }
        }
        let mut m = Model::assemble(path, cfg, tokenizer, eos, w, hf_files, dtype)?;
        m.load_seconds = t0.elapsed().as_secs_f64();
        Ok(m)
    }

    fn load_gguf(path: &Path, dtype: WeightDType) -> Result<Model> {
        let g = crate::io::gguf::GgufModel::load(path, dtype)?;
        let shown = path.display().to_string();
        let cfg = ModelConfig::from_json(&g.config, &shown)?;
        let tokenizer = Tokenizer::from_json(&g.tokenizer_json, &g.tokenizer_config, &shown)?;
        let hf_files =
            crate::io::hf_dir::gguf_side_files(&g.config, &g.tokenizer_json, &g.tokenizer_config)?;
        Model::assemble(path, cfg, tokenizer, vec![], g.weights, hf_files, dtype)
    }

    /// The decoder from its tensors; EOS ids from generation_config (`eos`), else config.json,
    /// else the tokenizer's eos token.
    fn assemble(
        path: &Path,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        mut eos: Vec<u32>,
        mut w: WeightMap,
        hf_files: BTreeMap<String, Vec<u8>>,
        dtype_choice: WeightDType,
    ) -> Result<Model> {
        if eos.is_empty() {
            eos = cfg.eos_token_ids.clone();
        }
        if eos.is_empty() {
            if let Some(id) = tokenizer
                .eos_token
                .as_deref()
                .and_then(|t| tokenizer.token_id(t))
            {
                eos.push(id);
            }
        }
        let source_dtype = w.source_dtype;
        let decoder = Decoder::from_weights(cfg, &mut w)?;
        let weight_storage = decoder.weight_storage();
        Ok(Model {
            decoder,
            tokenizer,
            eos_token_ids: eos,
            source: path.to_path_buf(),
            source_dtype,
            dtype_choice,
            weight_storage,
            load_seconds: 0.0, // set by the caller, which timed the whole load
            hf_files,
        })
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.decoder.cfg
    }

    /// Formats and tokenises prompt records.
    pub fn prompts(&self, records: &[PromptRecord], template: Template) -> Result<Vec<Prompt>> {
        records
            .iter()
            .map(|r| {
                let text = template.format(r, &self.tokenizer)?;
                let ids = template.encode(&text, &self.tokenizer)?;
                if ids.is_empty() {
                    bail!("prompt {:?} tokenises to nothing", r.instruction);
                }
                Ok(Prompt {
                    record: r.clone(),
                    text,
                    ids,
                })
            })
            .collect()
    }

    pub fn num_parameters(&self) -> usize {
        let d = &self.decoder;
        let mut n = d.embed.elem_count() + d.final_norm.weight.elem_count();
        if let Some(h) = &d.lm_head {
            n += h.elem_count();
        }
        for l in &d.layers {
            for lin in l.linears() {
                n += lin.weight.elem_count()
                    + lin.bias.as_ref().map(|b| b.elem_count()).unwrap_or(0);
            }
            for nrm in [
                Some(&l.attn_in_norm),
                Some(&l.mlp_in_norm),
                l.attn_out_norm.as_ref(),
                l.mlp_out_norm.as_ref(),
                l.attn.q_norm.as_ref(),
                l.attn.k_norm.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                n += nrm.weight.elem_count();
            }
        }
        n
    }
}
