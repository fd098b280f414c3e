//! `safety-layers finetune`: SPPFT (safety layers frozen), full fine-tuning and control freezes.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sl_engine::{LayerRange, Template};
use sl_science::finetune::data::SftRecord;
use sl_science::finetune::freeze::FreezeModule;
use sl_science::finetune::{finetune, FinetuneConfig, RunOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// Model: Hugging Face directory, .gguf file or catalog name
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: JSON array or JSONL of {instruction, input, output}, or a dataset name
    /// (finetune-normal = D_N, finetune-implicit = D_I)
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub freeze: FreezeArgs,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// linear, cosine or constant (each after --warmup-steps of linear warm-up)
    #[arg(long, default_value = "linear")]
    pub lr_schedule: String,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0 disables); transformers' Trainer default
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    /// Loss on the prompt tokens too (the paper's code does)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub train_on_inputs: bool,
    /// Records held out for the per-epoch held-out loss: the last N of the data
    #[arg(long, default_value_t = 100)]
    pub holdout: usize,
    /// Use only the first N records of the data (before the hold-out split)
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub no_shuffle: bool,
    /// Stop after N optimizer steps (the LR schedule still spans all epochs)
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Write a resumable checkpoint every N optimizer steps
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue the interrupted run in --out from its latest checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Keep checkpoints/ after a successful run
    #[arg(long)]
    pub keep_checkpoints: bool,
    /// Recompute each layer's forward during backward instead of keeping its activations
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// Freeze the input embeddings (with tied embeddings, the output head too). Off by default,
    /// as the paper trains them; when on, no backward work is done below the lowest trainable
    /// parameter
    #[arg(long)]
    pub freeze_embeddings: bool,
    /// bf16 mixed precision: every projection's and the head's products on bf16-rounded
    /// operands with f32 sums (torch's bf16 autocast of a linear layer; on AMX tiles where the
    /// CPU has them); weights, gradients and AdamW's moments stay f32. no or bf16
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// Storage dtype of the written weights: auto (the checkpoint's; f32 for GGUF), f32, bf16, f16
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Testing aid: abort the process right after this optimizer step, as a kill would
    #[arg(long, hide = true)]
    pub abort_after_step: Option<usize>,
}

/// The freeze options `finetune` and `export` share.
#[derive(clap::Args)]
pub struct FreezeArgs {
    /// Freeze layers I-J (0-indexed, inclusive): their --freeze-modules get no gradient
    #[arg(long, conflicts_with = "freeze_from")]
    pub freeze: Option<String>,
    /// Freeze the range chosen by `locate` (its locate.json)
    #[arg(long)]
    pub freeze_from: Option<PathBuf>,
    /// Which modules of the frozen layers to freeze
    #[arg(long, default_value = "attn,mlp", value_delimiter = ',')]
    pub freeze_modules: Vec<String>,
}

impl FreezeArgs {
    /// The range given by --freeze or --freeze-from, if any.
    pub fn range(&self, layers: usize) -> Result<Option<LayerRange>> {
        Ok(match (&self.freeze, &self.freeze_from) {
            (Some(s), _) => Some(LayerRange::parse(s, layers)?),
            (_, Some(p)) => Some(range_from_locate(p, layers)?),
            _ => None,
        })
    }

    /// The modules of --freeze-modules, by the one parser `finetune` also applies.
    pub fn modules(&self) -> Result<Vec<FreezeModule>> {
        FreezeModule::parse_list(&self.freeze_modules)
    }
}

/// The range a locate.json chose.
fn range_from_locate(p: &Path, layers: usize) -> Result<LayerRange> {
    sl_science::locate::file::LocateFile::read_range(p, layers)
}

/// Training records from a file or a dataset name, with a description for provenance.
pub fn training_data(spec: &str) -> Result<(Vec<SftRecord>, String)> {
    sl_science::inputs::training_data(spec, &crate::datasets::data_options())
}

pub fn run(a: &FinetuneArgs) -> Result<()> {
    let model = crate::datasets::load_model_for_training(&a.model)?;
    sl_engine::io::loader::tune_allocator_for_training();
    let layers = model.cfg().num_layers;
    let freeze = a.freeze.range(layers)?;
    let (mut records, data_desc) = training_data(&a.data)?;
    if let Some(n) = a.limit {
        records.truncate(n);
    }
    let cfg = FinetuneConfig {
        model: a.model.display().to_string(),
        data: data_desc,
        freeze,
        freeze_modules: a.freeze.freeze_modules.clone(),
        epochs: a.epochs,
        lr: a.lr,
        lr_schedule: a.lr_schedule.parse()?,
        warmup_steps: a.warmup_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        weight_decay: a.weight_decay,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        template: a.template.parse::<Template>()?,
        train_on_inputs: a.train_on_inputs,
        holdout: a.holdout,
        seed: a.seed,
        shuffle: !a.no_shuffle,
        grad_checkpointing: a.grad_checkpointing,
        freeze_embeddings: a.freeze_embeddings,
        train_layers: None,
        bf16_mixed: sl_science::finetune::parse_mixed_precision(&a.mixed_precision)
            .context("--mixed-precision")?,
        max_steps: a.max_steps,
        dtype: a.dtype.clone(),
    };
    let run = RunOptions {
        resume: a.resume,
        save_every: a.save_every,
        keep_checkpoints: a.keep_checkpoints,
        abort_after_step: a.abort_after_step,
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("finetune {pos} steps {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let summary = finetune(model, &records, &cfg, &run, &a.out, &mut |s| {
        bar.set_position(s.step as u64);
        bar.set_message(format!(
            "epoch {:.2} loss {:.4} lr {:.2e} {:.0} tok/s",
            s.epoch,
            s.loss,
            s.lr,
            s.tokens as f64 / s.seconds.max(1e-9)
        ));
    })?;
    bar.finish_and_clear();
    let s = &summary.record;
    eprintln!(
        "finetune: {} steps, {} tokens in {:.1} s, {:.1} tokens/s, final loss {:.4}, {} trainable \
         / {} frozen parameters, peak RSS {:.0} MB -> {}",
        s.steps,
        s.tokens,
        s.train_seconds,
        s.tokens_per_second,
        s.final_loss.unwrap_or(f64::NAN),
        s.trainable_parameters,
        s.frozen_parameters,
        s.peak_rss_mb.unwrap_or(0.0),
        a.out.display()
    );
    Ok(())
}
