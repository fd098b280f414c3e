//! The paper's remedy (§4): fine-tuning with the safety layers' attention and MLP weights frozen
//! (SPPFT), full fine-tuning, and control freezes — one loop, with checkpoints that a killed run
//! resumes from to the same final weights, a training log, and a freeze audit.
//!
//! The loop reads as the steps it takes: next batch, forward and backward (gradients
//! accumulated over the micro-batches of one optimizer step), update, maybe evaluate on the
//! held-out records at an epoch's end, maybe save a checkpoint.

pub mod checkpoint;
pub mod data;
pub mod freeze;
pub mod summary;

use crate::finetune::checkpoint::{checkpoints_dir, Checkpoint};
use crate::finetune::data::{encode, epoch_order, lr_factor, Example, Schedule, SftRecord};
use crate::finetune::freeze::{freeze_audit, tensor_hashes, FreezeModule, FreezePlan};
use crate::finetune::summary::{Examples, FinetuneSummary, HoldoutLoss, SCHEMA_VERSION};
use crate::schema::Precision;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sl_engine::io::atomic::{write_atomic, StagedDir};
use sl_engine::io::hf_dir::write_hf_files;
use sl_engine::train::adamw::AdamWConfig;
use sl_engine::train::trainer::{Batch, Trainer};
use sl_engine::{LayerRange, Model, Template};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    pub model: String,
    pub data: String,
    /// Layers whose `freeze_modules` are frozen (0-indexed, inclusive).
    pub freeze: Option<LayerRange>,
    pub freeze_modules: Vec<String>,
    pub epochs: usize,
    pub lr: f64,
    pub lr_schedule: Schedule,
    pub warmup_steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub weight_decay: f64,
    /// None: no clipping.
    pub max_grad_norm: Option<f64>,
    pub template: Template,
    pub train_on_inputs: bool,
    pub holdout: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub grad_checkpointing: bool,
    /// The input embeddings get no gradient (with tied embeddings this freezes the output head
    /// too: it is the same tensor). Left out of the JSON when off, so checkpoints written
    /// before the option existed still resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_embeddings: bool,
    /// Only the attention and MLP parameters of these layers train; everything else (other
    /// layers, every norm, the embeddings and the head) is frozen: a behaviour planted in
    /// exactly these layers (`align --train-layers`). Left out of the JSON when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_layers: Option<LayerRange>,
    /// bf16 mixed precision: the projections' and head's products on bf16-rounded operands
    /// with f32 sums (torch's bf16 autocast of a linear layer); weights, gradients and AdamW's
    /// moments stay f32. Left out of the JSON when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16_mixed: bool,
    /// Stop after this many optimizer steps (the schedule still spans the full run).
    pub max_steps: Option<usize>,
    /// Storage dtype of the written weights: f32, bf16 or f16.
    pub dtype: String,
}

/// `--mixed-precision`: "no" or "bf16" (whether `bf16_mixed` is on).
pub fn parse_mixed_precision(s: &str) -> Result<bool> {
    match s {
        "no" => Ok(false),
        "bf16" => Ok(true),
        other => bail!("mixed precision must be no or bf16, got {other:?}"),
    }
}

impl FinetuneConfig {
    /// What a checkpoint must agree on to be resumed: everything that shapes the arithmetic.
    fn fingerprint(&self) -> Result<String> {
        Ok(crate::sha256_hex(serde_json::to_string(self)?.as_bytes()))
    }

    /// The freeze plan of `--freeze` and `--freeze-modules` (None: nothing frozen).
    fn freeze_plan(
        &self,
        model: &sl_engine::io::config::ModelConfig,
    ) -> Result<Option<FreezePlan>> {
        self.freeze
            .map(|range| {
                FreezePlan::new(
                    model,
                    range,
                    FreezeModule::parse_list(&self.freeze_modules)?,
                )
            })
            .transpose()
    }
}

/// Options that do not change the result.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub resume: bool,
    /// Write a checkpoint every N optimizer steps.
    pub save_every: Option<usize>,
    pub keep_checkpoints: bool,
    /// Testing aid: abort the process (as a kill would) right after this optimizer step.
    pub abort_after_step: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub tokens: usize,
    pub seconds: f64,
}

pub struct Summary {
    pub record: FinetuneSummary,
    /// `record` as JSON.
    pub json: Value,
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

fn parse_dtype(s: &str, source: DType) -> Result<DType> {
    Ok(match s {
        "auto" => match source {
            DType::BF16 | DType::F16 => source,
            _ => DType::F32,
        },
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => bail!("unknown --dtype `{s}` (expected auto, f32, bf16 or f16)"),
    })
}

/// Fine-tunes `model` on `records` and writes the result into `out` (see the module docs).
pub fn finetune(
    model: Model,
    records: &[SftRecord],
    cfg: &FinetuneConfig,
    run: &RunOptions,
    out: &Path,
    progress: &mut dyn FnMut(&StepLog),
) -> Result<Summary> {
    let t_start = Instant::now();
    validate(cfg, records.len(), model.cfg().num_layers)?;
    let out_dtype = parse_dtype(&cfg.dtype, model.source_dtype)?;
    let resume_from = match prepare_out(out, run.resume)? {
        Start::Fresh => None,
        Start::From(ckpt) => Some(ckpt),
        Start::Finished => {
            eprintln!(
                "--resume: {} holds a finished run (killed while removing its checkpoints); \
                 removed them",
                out.display()
            );
            let record = summary::read(&out.join("finetune.json"))?;
            let json = serde_json::to_value(&record)?;
            return Ok(Summary { record, json });
        }
    };
    let split = records.len() - cfg.holdout;
    let train = encode_all(&model, &records[..split], cfg)?;
    let held = encode_all(&model, &records[split..], cfg)?;
    let before = tensor_hashes(&model.decoder.hf_tensors()?)?;
    let precision = Precision::of(&model);

    let Model {
        decoder, hf_files, ..
    } = model;
    let plan = cfg.freeze_plan(&decoder.cfg)?;
    let frozen = |i: &sl_engine::model::params::ParamInfo| {
        use sl_engine::model::layout::Module;
        let outside_planted = cfg.train_layers.is_some_and(|r| {
            let planted = i.layer.is_some_and(|l| r.layers().contains(&l));
            !(planted && matches!(i.module, Module::Attn | Module::Mlp))
        });
        outside_planted
            || (cfg.freeze_embeddings && i.module == Module::Embed)
            || plan
                .as_ref()
                .is_some_and(|p| p.freezes_param(i.layer, i.module))
    };
    let adam = AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..AdamWConfig::default()
    };
    let mut trainer = Trainer::new(decoder, frozen, adam, cfg.grad_checkpointing)?;
    if cfg.bf16_mixed {
        trainer.set_precision(sl_engine::train::Precision::Bf16)?;
    }
    let fingerprint = cfg.fingerprint()?;
    let mut ckpt = match &resume_from {
        Some(dir) => checkpoint::resume(&mut trainer, dir, &fingerprint)?,
        None => Checkpoint::start(fingerprint),
    };
    let mut log = TrainLog::open(&out.join("train_log.jsonl"), &ckpt)?;
    let mut steps = Steps::new(&train, cfg);
    let held_batches = batches(&held.iter().collect::<Vec<_>>(), cfg.batch_size)?;
    // A resumed run's earlier held-out losses are in its log.
    let mut holdout_losses: Vec<HoldoutLoss> = ckpt.log.iter().filter_map(holdout_entry).collect();
    let clock = Clock::resume(ckpt.seconds);
    while let Some(micro) = steps.next(&ckpt)? {
        let (loss, targets) = forward_backward(&mut trainer, &micro)?;
        let lr = update(&mut trainer, cfg, ckpt.global_step, steps.total)?;
        let entry = advance(
            &mut ckpt,
            &micro,
            loss / targets.max(1) as f64,
            lr,
            &steps,
            &clock,
        );
        progress(&entry);
        log.append(&mut ckpt, serde_json::to_value(&entry)?)?;
        if ckpt.step_in_epoch == steps.per_epoch {
            ckpt.epoch += 1;
            ckpt.step_in_epoch = 0;
            if let Some(l) = evaluate(&trainer, &held_batches)? {
                holdout_losses.push(HoldoutLoss {
                    epoch: ckpt.epoch,
                    step: ckpt.global_step,
                    holdout_loss: l,
                });
                let entry = json!({"step": ckpt.global_step, "epoch": ckpt.epoch as f64,
                                   "holdout_loss": l, "seconds": ckpt.seconds});
                log.append(&mut ckpt, entry)?;
            }
        }
        if run.saves_at(ckpt.global_step) {
            checkpoint::save(&trainer, &ckpt, out)?;
        }
        if run.abort_after_step == Some(ckpt.global_step) {
            std::process::abort();
        }
    }

    // Outputs: the model, the audit, the summary.
    let tensors = trainer.decoder.hf_tensors()?;
    let audit = freeze_audit(&trainer, &before, &tensors)?;
    let stage = StagedDir::new(&out.join(".model"))?;
    write_hf_files(&stage, &tensors, out_dtype, &hf_files, 5 << 30)?;
    stage.write_json("freeze_audit.json", &audit)?;
    let train_seconds = ckpt.seconds;
    let record = FinetuneSummary {
        schema_version: SCHEMA_VERSION,
        config: cfg.clone(),
        examples: Examples {
            train: train.len(),
            holdout: held.len(),
            holdout_rule: "the last --holdout records of the data".into(),
        },
        steps: ckpt.global_step,
        steps_per_epoch: steps.per_epoch,
        total_steps_scheduled: steps.total,
        tokens: ckpt.tokens,
        train_seconds,
        tokens_per_second: ckpt.tokens as f64 / train_seconds.max(1e-9),
        final_loss: ckpt
            .log
            .iter()
            .rev()
            .find_map(|v| v.get("loss").and_then(|l| l.as_f64())),
        holdout_losses,
        trainable_parameters: trainer
            .trainable
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>(),
        frozen_parameters: audit["frozen_parameters"].as_u64().unwrap_or(0) as usize,
        frozen_tensors_identical: audit["all_frozen_identical"].as_bool().unwrap_or(false),
        peak_rss_mb: peak_rss_mb(),
        wall_seconds: t_start.elapsed().as_secs_f64(),
        resumed: resume_from.is_some(),
        output_dtype: format!("{out_dtype:?}").to_lowercase(),
        precision: Some(precision),
    };
    stage.write(
        "finetune.json",
        crate::schema::to_pretty(&record)?.as_bytes(),
    )?;
    stage.commit_into(out)?;
    if !run.keep_checkpoints {
        // Whole or gone: a run killed here is finished, and a half-deleted checkpoint must not
        // read as one to resume from.
        if let Err(e) = sl_engine::io::atomic::remove_dir(&checkpoints_dir(out)) {
            eprintln!("warning: the run is complete but its checkpoints stay: {e:#}");
        }
    }
    let json = serde_json::to_value(&record)?;
    Ok(Summary { record, json })
}

/// The held-out loss a `train_log.jsonl` line records, if it is such a line.
fn holdout_entry(v: &Value) -> Option<HoldoutLoss> {
    Some(HoldoutLoss {
        epoch: v.get("epoch")?.as_f64()? as usize,
        step: v.get("step")?.as_u64()? as usize,
        holdout_loss: v.get("holdout_loss")?.as_f64()?,
    })
}

impl RunOptions {
    /// Whether a checkpoint is written after optimizer step `step`.
    fn saves_at(&self, step: usize) -> bool {
        self.save_every
            .is_some_and(|n| n > 0 && step.is_multiple_of(n))
    }
}

/// Where a run starts.
enum Start {
    /// From step 0 (a new run, or a resumed one killed before its first checkpoint).
    Fresh,
    /// From this checkpoint.
    From(PathBuf),
    /// Nowhere: the run had finished and was killed while removing its checkpoints, which
    /// this removed.
    Finished,
}

/// Where the run in `out` starts, after checking that `out` is free for a new run.
fn prepare_out(out: &Path, resume: bool) -> Result<Start> {
    let start = if resume {
        let latest = checkpoint::latest(out);
        // A run killed before its first checkpoint resumes from step 0; a finished one (its
        // config.json is moved in last) has nothing to resume, but may have been killed while
        // removing its checkpoints (renamed to a temporary first, so none is ever half there).
        if latest.is_none() && out.join("config.json").exists() {
            let leftovers = checkpoints_dir(out).exists()
                || sl_engine::io::atomic::has_temporary(out, "checkpoints");
            if !leftovers {
                bail!(
                    "--resume: {} holds a finished run and no checkpoint; nothing to resume",
                    out.display()
                );
            }
            sl_engine::io::atomic::remove_dir(&checkpoints_dir(out))?;
            return Ok(Start::Finished);
        }
        latest.map_or(Start::Fresh, Start::From)
    } else {
        if sl_engine::io::atomic::occupied(out) {
            bail!(
                "output directory {} already exists and is not empty (use --resume to continue a \
                 run there)",
                out.display()
            );
        }
        Start::Fresh
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(start)
}

fn encode_all(model: &Model, recs: &[SftRecord], cfg: &FinetuneConfig) -> Result<Vec<Example>> {
    recs.iter()
        .enumerate()
        .map(|(i, r)| {
            let e = encode(model, r, cfg.template, cfg.max_len, cfg.train_on_inputs)?;
            if e.ids.len() < 2 {
                bail!(
                    "training record {i} ({:?}) tokenises to fewer than two tokens",
                    r.instruction
                );
            }
            Ok(e)
        })
        .collect()
}

/// `examples` as left-padded micro-batches of `size`.
fn batches(examples: &[&Example], size: usize) -> Result<Vec<Batch>> {
    examples
        .chunks(size)
        .map(|mb| {
            let ids: Vec<&[u32]> = mb.iter().map(|e| e.ids.as_slice()).collect();
            let from: Vec<usize> = mb.iter().map(|e| e.supervised_from).collect();
            Batch::new(&ids, &from, &Device::Cpu)
        })
        .collect()
}

/// The run's optimizer steps: each epoch's order of the training examples, cut into
/// micro-batches of `batch_size`, `grad_accum` of them per step.
struct Steps<'a> {
    train: &'a [Example],
    cfg: &'a FinetuneConfig,
    per_epoch: usize,
    /// Steps the schedule spans (all epochs).
    total: usize,
    /// Steps actually taken (`max_steps` may stop early).
    stop_at: usize,
    /// The current epoch and its order.
    order: Option<(usize, Vec<usize>)>,
}

impl<'a> Steps<'a> {
    fn new(train: &'a [Example], cfg: &'a FinetuneConfig) -> Steps<'a> {
        let micro_per_epoch = train.len().div_ceil(cfg.batch_size);
        let per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
        let total = per_epoch * cfg.epochs;
        Steps {
            train,
            cfg,
            per_epoch,
            total,
            stop_at: cfg.max_steps.unwrap_or(usize::MAX).min(total),
            order: None,
        }
    }

    /// The micro-batches of the step the run stands at; None when the run is over.
    fn next(&mut self, at: &Checkpoint) -> Result<Option<Vec<Batch>>> {
        if at.epoch >= self.cfg.epochs || at.global_step >= self.stop_at {
            return Ok(None);
        }
        if self.order.as_ref().map(|(e, _)| *e) != Some(at.epoch) {
            let (n, c) = (self.train.len(), self.cfg);
            self.order = Some((at.epoch, epoch_order(n, c.seed, at.epoch, c.shuffle)));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let per_step = self.cfg.batch_size * self.cfg.grad_accum;
        let start = at.step_in_epoch * per_step;
        let examples: Vec<&Example> = order[start..(start + per_step).min(order.len())]
            .iter()
            .map(|&i| &self.train[i])
            .collect();
        batches(&examples, self.cfg.batch_size).map(Some)
    }
}

/// Forward and backward over the micro-batches of one step, gradients accumulated with each
/// token weighted alike; returns the summed loss and the number of supervised tokens.
fn forward_backward(trainer: &mut Trainer, micro: &[Batch]) -> Result<(f64, usize)> {
    let targets: usize = micro.iter().map(|b| b.num_targets).sum();
    let mut loss_sum = 0.0;
    for b in micro {
        let scale = 1.0 / targets.max(1) as f64;
        loss_sum += sl_engine::kernels::on_workers(|| trainer.accumulate(b, scale))?;
    }
    Ok((loss_sum, targets))
}

/// The optimizer step at the schedule's learning rate for `step`; returns that rate.
fn update(trainer: &mut Trainer, cfg: &FinetuneConfig, step: usize, total: usize) -> Result<f64> {
    let lr = cfg.lr * lr_factor(cfg.lr_schedule, step, total, cfg.warmup_steps);
    sl_engine::kernels::on_workers(|| trainer.apply(lr, cfg.max_grad_norm))?;
    Ok(lr)
}

/// The held-out loss, if any records are held out.
fn evaluate(trainer: &Trainer, held: &[Batch]) -> Result<Option<f64>> {
    if held.is_empty() {
        return Ok(None);
    }
    trainer.eval_loss(held).map(Some)
}

/// Training time across resumptions.
struct Clock {
    before: f64,
    since: Instant,
}

impl Clock {
    fn resume(before: f64) -> Clock {
        Clock {
            before,
            since: Instant::now(),
        }
    }

    fn seconds(&self) -> f64 {
        self.before + self.since.elapsed().as_secs_f64()
    }
}

/// Moves the checkpoint past the step just taken and returns its log entry.
fn advance(
    ckpt: &mut Checkpoint,
    micro: &[Batch],
    loss: f64,
    lr: f64,
    steps: &Steps,
    clock: &Clock,
) -> StepLog {
    ckpt.global_step += 1;
    ckpt.step_in_epoch += 1;
    ckpt.tokens += micro.iter().map(|b| b.num_tokens).sum::<usize>();
    ckpt.seconds = clock.seconds();
    StepLog {
        step: ckpt.global_step,
        epoch: ckpt.epoch as f64 + ckpt.step_in_epoch as f64 / steps.per_epoch as f64,
        loss,
        lr,
        tokens: ckpt.tokens,
        seconds: ckpt.seconds,
    }
}

/// `train_log.jsonl`: rewritten from the checkpoint's copy on start, then appended line by line.
struct TrainLog {
    file: std::fs::File,
}

impl TrainLog {
    fn open(path: &Path, ckpt: &Checkpoint) -> Result<TrainLog> {
        let text: String = ckpt.log.iter().map(|v| format!("{v}\n")).collect();
        write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(TrainLog { file })
    }

    fn append(&mut self, ckpt: &mut Checkpoint, v: Value) -> Result<()> {
        // One write per line: a kill leaves whole lines (and a resume rewrites the log anyway).
        self.file.write_all(format!("{v}\n").as_bytes())?;
        ckpt.log.push(v);
        Ok(())
    }
}

fn validate(cfg: &FinetuneConfig, n: usize, layers: usize) -> Result<()> {
    if cfg.epochs == 0 || cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.max_len < 2 {
        bail!(
            "--epochs, --batch-size and --grad-accum must be at least 1 and --max-len at least 2"
        );
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", cfg.lr);
    }
    if !(cfg.weight_decay.is_finite() && cfg.weight_decay >= 0.0) {
        bail!("--weight-decay must be >= 0, got {}", cfg.weight_decay);
    }
    if cfg.holdout >= n {
        bail!(
            "--holdout {} leaves no training records out of {n}",
            cfg.holdout
        );
    }
    if let Some(r) = cfg.train_layers {
        if r.last >= layers || r.first > r.last {
            bail!(
                "--train-layers {}-{} is not a range of the model's {layers} layers",
                r.first,
                r.last
            );
        }
    }
    if let Some(r) = cfg.freeze {
        if r.last >= layers {
            bail!(
                "--freeze {}-{} is outside the model's {layers} layers",
                r.first,
                r.last
            );
        }
    }
    // `align` freezes nothing and names no modules; an empty list is an error only with a range.
    if cfg.freeze.is_some() || !cfg.freeze_modules.is_empty() {
        FreezeModule::parse_list(&cfg.freeze_modules)?;
    }
    Ok(())
}
