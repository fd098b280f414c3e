//! `safety-layers export`: the SPPFT freeze plan as a ready config for trainers that shard big
//! models across GPUs (axolotl, PEFT LoRA, Hugging Face Trainer + DeepSpeed ZeRO-2). Only the
//! model's config is read, never its weights, so a 70B checkpoint exports as fast as a tiny one.

use anyhow::{bail, Context, Result};
use sl_engine::io::atomic::StagedDir;
use sl_engine::ModelConfig;
use sl_science::export::formats::{render, Format, Sources};
use sl_science::export::plan::{paper_lr, FreezePlan, Recipe};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Model: Hugging Face directory (its config.json is enough), a config.json file, a .gguf file
    /// or catalog name
    #[arg(long)]
    pub model: PathBuf,
    /// axolotl (YAML with unfrozen_parameters), peft (LoRA adapter_config.json) or hf-trainer
    /// (Trainer + DeepSpeed ZeRO-2 script)
    #[arg(long)]
    pub format: String,
    /// Output directory (must not exist or be empty)
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub freeze: crate::finetune_cmd::FreezeArgs,
    /// What the trainers load (a Hugging Face directory or hub id); default: the --model directory
    #[arg(long)]
    pub base_model: Option<String>,
    /// Training records (JSON array or JSONL of {instruction, input, output}) or a dataset name
    #[arg(long, default_value = "finetune-normal")]
    pub data: String,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Learning rate; default: the paper's for this model (Table 6), else 1e-4
    #[arg(long)]
    pub lr: Option<f64>,
    /// linear, cosine or constant (each after --warmup-steps of linear warm-up)
    #[arg(long, default_value = "linear")]
    pub lr_schedule: String,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// Micro-batch size per GPU
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Gradient accumulation steps (the paper's code: 32, for a batch of 128 on one process)
    #[arg(long, default_value_t = 32)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Records held out for evaluation
    #[arg(long, default_value_t = 100)]
    pub holdout: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Loss on the prompt tokens too (the paper's code does)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub train_on_inputs: bool,
    /// fp32 (the paper's) or bf16 (mixed precision)
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// LoRA rank (peft format)
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16)]
    pub lora_alpha: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
}

/// The model's config without its weights, where it came from, and the HF directory it sits in
/// (None for a GGUF file, which these trainers cannot load).
fn model_config(spec: &Path) -> Result<(ModelConfig, String, Option<PathBuf>)> {
    let path = if spec.exists() {
        spec.to_path_buf()
    } else {
        crate::datasets::model_path(spec)?
    };
    let shown = path.display().to_string();
    if path.is_dir() {
        let file = path.join("config.json");
        if !file.is_file() {
            bail!("{shown}: config.json is missing (export reads the model's shape from it)");
        }
        return Ok((
            ModelConfig::from_file(&file)?,
            file.display().to_string(),
            Some(path),
        ));
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "gguf" => {
            let v = sl_engine::io::gguf::read_config(&path)?;
            Ok((
                ModelConfig::from_json(&v, &shown)?,
                format!("{shown} (GGUF metadata)"),
                None,
            ))
        }
        "json" => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            Ok((ModelConfig::from_file(&path)?, shown, Some(dir)))
        }
        _ => bail!(
            "--model {shown}: expected a Hugging Face directory, a config.json, a .gguf file or a \
             catalog name"
        ),
    }
}

fn absolute(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// A local file (made absolute, so the config works from any directory), a catalog dataset
/// (resolved and verified), or a path on the training machine, written as given.
fn data_source(spec: &str) -> Result<String> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(absolute(p));
    }
    if let Some((path, _)) = crate::datasets::dataset_file(spec)? {
        return Ok(absolute(&path));
    }
    eprintln!(
        "export: --data {spec} is neither a file here nor a dataset name; written as given (a path \
         on the training machine?)"
    );
    Ok(spec.to_string())
}

pub fn run(a: &ExportArgs) -> Result<()> {
    let format: Format = a.format.parse()?;
    let (cfg, config_from, hf_dir) = model_config(&a.model)
        .with_context(|| format!("cannot read the config of model {}", a.model.display()))?;
    if cfg.num_layers == 0 {
        bail!("{config_from}: the model has no layers (num_hidden_layers = 0)");
    }
    let Some(range) = a.freeze.range(cfg.num_layers)? else {
        bail!("give the range to freeze with --freeze I-J or --freeze-from DIR/locate.json");
    };
    let plan = FreezePlan::new(&cfg, range, a.freeze.modules()?)?;
    let (paper, paper_source) = paper_lr(&cfg);
    let recipe = Recipe {
        epochs: a.epochs,
        lr: a.lr.unwrap_or(paper),
        lr_source: if a.lr.is_some() {
            "--lr".into()
        } else {
            paper_source
        },
        lr_schedule: a.lr_schedule.clone(),
        warmup_steps: a.warmup_steps,
        micro_batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        adam_beta1: 0.9,
        adam_beta2: 0.999,
        adam_epsilon: 1e-8,
        holdout: a.holdout,
        seed: a.seed,
        train_on_inputs: a.train_on_inputs,
        precision: a.precision.clone(),
        grad_checkpointing: a.grad_checkpointing,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
    };
    recipe.validate()?;
    let base_model = match (&a.base_model, &hf_dir) {
        (Some(b), _) => b.clone(),
        (None, Some(dir)) => absolute(dir),
        (None, None) => bail!(
            "{config_from}: a GGUF file is not what these trainers load; give --base-model (a \
             Hugging Face directory or hub id, e.g. the output of `safety-layers convert`)"
        ),
    };
    let src = Sources {
        base_model,
        data: data_source(&a.data)?,
        config_from,
    };
    // Everything is rendered before the directory is created, so a refused plan leaves nothing.
    let files = render(format, &plan, &cfg, &recipe, &src)?;
    let stage = StagedDir::new(&a.out)?;
    for (name, text) in &files {
        stage.write(name, text.as_bytes())?;
    }
    stage.commit()?;
    let (frozen, trainable) = plan.split();
    eprintln!(
        "export: {} for {} ({} layers): layers {} {} frozen, {} of {} tensors; lr {} ({}) -> {} \
         ({})",
        a.format,
        cfg.architecture,
        cfg.num_layers,
        plan.range,
        plan.modules
            .iter()
            .map(|m| m.hf_module())
            .collect::<Vec<_>>()
            .join("+"),
        frozen.len(),
        frozen.len() + trainable.len(),
        recipe.lr,
        recipe.lr_source,
        a.out.display(),
        files
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
