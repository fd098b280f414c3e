//! The paper's remedy (§4): fine-tuning with the safety layers' attention and MLP weights frozen
//! (SPPFT), full fine-tuning, and control freezes — one loop, with checkpoints that a killed run
//! resumes from to the same final weights, a training log, and a freeze audit.

pub mod data;

use crate::finetune::data::{encode, epoch_order, lr_factor, Example, Schedule, SftRecord};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sl_engine::io::atomic::{write_atomic, StagedDir};
use sl_engine::io::hf_dir::{safetensors_bytes, write_hf_files};
use sl_engine::model::params::{hf_names_of, Module, ParamInfo};
use sl_engine::train::adamw::AdamWConfig;
use sl_engine::train::trainer::{Batch, Trainer};
use sl_engine::{LayerRange, Model, Template};
use std::collections::BTreeMap;
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
    /// Stop after this many optimizer steps (the schedule still spans the full run).
    pub max_steps: Option<usize>,
    /// Storage dtype of the written weights: f32, bf16 or f16.
    pub dtype: String,
}

impl FinetuneConfig {
    /// What a checkpoint must agree on to be resumed: everything that shapes the arithmetic.
    fn fingerprint(&self) -> Result<String> {
        Ok(crate::sha256_hex(serde_json::to_string(self)?.as_bytes()))
    }

    fn frozen(&self, info: &ParamInfo) -> bool {
        let Some(range) = self.freeze else {
            return false;
        };
        let in_range = info.layer.is_some_and(|l| range.layers().contains(&l));
        let module = match info.module {
            Module::Attn => "attn",
            Module::Mlp => "mlp",
            _ => return false,
        };
        in_range && self.freeze_modules.iter().any(|m| m == module)
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

/// Where the run is, saved in every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Position {
    fingerprint: String,
    global_step: usize,
    epoch: usize,
    /// Next optimizer step within the epoch.
    step_in_epoch: usize,
    tokens: usize,
    seconds: f64,
    log: Vec<Value>,
}

pub struct Summary {
    pub json: Value,
}

fn sha_of(t: &Tensor) -> Result<String> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(crate::sha256_hex(&bytes))
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

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(checkpoints_dir(out))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join("state.json").is_file()
        })
        .collect();
    found.sort();
    found.pop()
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
    let resume_from = if run.resume {
        Some(latest_checkpoint(out).ok_or_else(|| {
            anyhow::anyhow!(
                "--resume: no checkpoint under {}",
                checkpoints_dir(out).display()
            )
        })?)
    } else {
        if sl_engine::io::atomic::occupied(out) {
            bail!("output directory {} already exists and is not empty (use --resume to continue a run there)", out.display());
        }
        None
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let split = records.len() - cfg.holdout;
    let encode_all = |recs: &[SftRecord]| -> Result<Vec<Example>> {
        recs.iter()
            .enumerate()
            .map(|(i, r)| {
                let e = encode(&model, r, cfg.template, cfg.max_len, cfg.train_on_inputs)?;
                if e.ids.len() < 2 {
                    bail!(
                        "training record {i} ({:?}) tokenises to fewer than two tokens",
                        r.instruction
                    );
                }
                Ok(e)
            })
            .collect()
    };
    let train = encode_all(&records[..split])?;
    let held = encode_all(&records[split..])?;
    let before: BTreeMap<String, String> = model
        .decoder
        .hf_tensors()?
        .iter()
        .map(|(n, t)| Ok((n.clone(), sha_of(t)?)))
        .collect::<Result<_>>()?;

    let Model {
        decoder, hf_files, ..
    } = model;
    let adam = AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..AdamWConfig::default()
    };
    let mut trainer = Trainer::new(decoder, |i| cfg.frozen(i), adam, cfg.grad_checkpointing)?;
    let fingerprint = cfg.fingerprint()?;
    let micro_per_epoch = train.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut pos = Position {
        fingerprint: fingerprint.clone(),
        global_step: 0,
        epoch: 0,
        step_in_epoch: 0,
        tokens: 0,
        seconds: 0.0,
        log: vec![],
    };
    if let Some(ckpt) = &resume_from {
        pos = load_checkpoint(&mut trainer, ckpt)?;
        if pos.fingerprint != fingerprint {
            bail!("--resume: {} was written by a run with different settings or data; start a new run in a new directory", ckpt.display());
        }
    }
    let log_path = out.join("train_log.jsonl");
    let log_text: String = pos.log.iter().map(|v| format!("{v}\n")).collect();
    write_atomic(&log_path, log_text.as_bytes())?;
    let mut log_file = std::fs::OpenOptions::new().append(true).open(&log_path)?;
    let mut append = |pos: &mut Position, v: Value| -> Result<()> {
        writeln!(log_file, "{v}")?;
        log_file.flush()?;
        pos.log.push(v);
        Ok(())
    };

    let device = Device::Cpu;
    let batch_of = |examples: &[&Example]| {
        Batch::new(
            &examples
                .iter()
                .map(|e| e.ids.as_slice())
                .collect::<Vec<_>>(),
            &examples
                .iter()
                .map(|e| e.supervised_from)
                .collect::<Vec<_>>(),
            &device,
        )
    };
    let held_refs: Vec<&Example> = held.iter().collect();
    let held_batches: Vec<Batch> = held_refs
        .chunks(cfg.batch_size)
        .map(batch_of)
        .collect::<Result<_>>()?;
    let mut holdout_losses = vec![];
    let seconds_before = pos.seconds;
    let t_loop = Instant::now();
    let stop_at = cfg.max_steps.unwrap_or(usize::MAX).min(total_steps);
    'epochs: while pos.epoch < cfg.epochs {
        let order = epoch_order(train.len(), cfg.seed, pos.epoch, cfg.shuffle);
        let micro: Vec<Vec<&Example>> = order
            .chunks(cfg.batch_size)
            .map(|c| c.iter().map(|&i| &train[i]).collect())
            .collect();
        let steps: Vec<&[Vec<&Example>]> = micro.chunks(cfg.grad_accum).collect();
        while pos.step_in_epoch < steps.len() {
            if pos.global_step >= stop_at {
                break 'epochs;
            }
            let group = steps[pos.step_in_epoch];
            let batches: Vec<Batch> = group.iter().map(|mb| batch_of(mb)).collect::<Result<_>>()?;
            let targets: usize = batches.iter().map(|b| b.num_targets).sum();
            let mut loss_sum = 0.0;
            for b in &batches {
                loss_sum += trainer.accumulate(b, 1.0 / targets.max(1) as f64)?;
            }
            let lr = cfg.lr
                * lr_factor(
                    cfg.lr_schedule,
                    pos.global_step,
                    total_steps,
                    cfg.warmup_steps,
                );
            trainer.apply(lr, cfg.max_grad_norm)?;
            pos.global_step += 1;
            pos.step_in_epoch += 1;
            pos.tokens += batches.iter().map(|b| b.num_tokens).sum::<usize>();
            pos.seconds = seconds_before + t_loop.elapsed().as_secs_f64();
            let entry = StepLog {
                step: pos.global_step,
                epoch: pos.epoch as f64 + pos.step_in_epoch as f64 / steps.len() as f64,
                loss: loss_sum / targets.max(1) as f64,
                lr,
                tokens: pos.tokens,
                seconds: pos.seconds,
            };
            progress(&entry);
            append(&mut pos, serde_json::to_value(&entry)?)?;
            if pos.step_in_epoch == steps.len() {
                pos.epoch += 1;
                pos.step_in_epoch = 0;
                if !held_batches.is_empty() {
                    let l = trainer.eval_loss(&held_batches)?;
                    holdout_losses.push(
                        json!({"epoch": pos.epoch, "step": pos.global_step, "holdout_loss": l}),
                    );
                    let entry = json!({"step": pos.global_step, "epoch": pos.epoch as f64, "holdout_loss": l, "seconds": pos.seconds});
                    append(&mut pos, entry)?;
                }
            }
            if run
                .save_every
                .is_some_and(|n| n > 0 && pos.global_step % n == 0)
            {
                save_checkpoint(&trainer, &pos, out)?;
            }
            if run.abort_after_step == Some(pos.global_step) {
                std::process::abort();
            }
            if pos.step_in_epoch == 0 {
                // The epoch ended: the next one has its own order.
                break;
            }
        }
    }

    // Outputs: the model, the audit, the summary.
    let tensors = trainer.decoder.hf_tensors()?;
    let audit = freeze_audit(&trainer, &before, &tensors)?;
    let stage = StagedDir::new(&out.join(".model"))?;
    write_hf_files(&stage, &tensors, out_dtype, &hf_files, 5 << 30)?;
    stage.write_json("freeze_audit.json", &audit)?;
    let train_seconds = pos.seconds;
    let json = json!({
        "config": cfg,
        "examples": {"train": train.len(), "holdout": held.len(), "holdout_rule": "the last --holdout records of the data"},
        "steps": pos.global_step,
        "steps_per_epoch": steps_per_epoch,
        "total_steps_scheduled": total_steps,
        "tokens": pos.tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": pos.tokens as f64 / train_seconds.max(1e-9),
        "final_loss": pos.log.iter().rev().find_map(|v| v.get("loss").and_then(|l| l.as_f64())),
        "holdout_losses": holdout_losses,
        "trainable_parameters": trainer.trainable.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        "frozen_parameters": audit["frozen_parameters"],
        "frozen_tensors_identical": audit["all_frozen_identical"],
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": t_start.elapsed().as_secs_f64(),
        "resumed": resume_from.is_some(),
        "output_dtype": format!("{out_dtype:?}").to_lowercase(),
    });
    stage.write_json("finetune.json", &json)?;
    stage.commit_into(out)?;
    if !run.keep_checkpoints {
        let _ = std::fs::remove_dir_all(checkpoints_dir(out));
    }
    Ok(Summary { json })
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
    if let Some(r) = cfg.freeze {
        if r.last >= layers {
            bail!(
                "--freeze {}-{} is outside the model's {layers} layers",
                r.first,
                r.last
            );
        }
    }
    for m in &cfg.freeze_modules {
        if m != "attn" && m != "mlp" {
            bail!("unknown --freeze-modules entry `{m}` (expected attn, mlp)");
        }
    }
    Ok(())
}

/// For every Hugging Face tensor: frozen or not, and the hash of its values before and after.
fn freeze_audit(
    trainer: &Trainer,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, Tensor>,
) -> Result<Value> {
    let family = trainer.decoder.cfg.family;
    let frozen: std::collections::HashSet<String> = trainer
        .frozen
        .iter()
        .flat_map(|i| hf_names_of(&i.name, family))
        .collect();
    let mut rows = vec![];
    let (mut all_identical, mut frozen_params) = (true, 0usize);
    for (name, t) in after {
        let is_frozen = frozen.contains(name);
        let h_after = sha_of(t)?;
        let h_before = before.get(name).cloned().unwrap_or_default();
        let identical = h_after == h_before;
        if is_frozen {
            frozen_params += t.elem_count();
            if !identical {
                all_identical = false;
            }
        }
        rows.push(json!({"name": name, "frozen": is_frozen, "sha256_before": h_before, "sha256_after": h_after, "identical": identical}));
    }
    if !all_identical {
        bail!("freeze audit failed: a frozen tensor changed during training (this is a bug)");
    }
    Ok(json!({
        "hash": "sha256 of the tensor's float32 little-endian values, in Hugging Face layout",
        "frozen_tensors": frozen.len(),
        "frozen_parameters": frozen_params,
        "all_frozen_identical": all_identical,
        "tensors": rows,
    }))
}

fn save_checkpoint(trainer: &Trainer, pos: &Position, out: &Path) -> Result<()> {
    let dir = checkpoints_dir(out);
    std::fs::create_dir_all(&dir)?;
    let dest = dir.join(format!("step-{:08}", pos.global_step));
    let stage = StagedDir::new(&dest)?;
    let mut params = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for ((info, var), st) in trainer.trainable.iter().zip(&trainer.optimizer.moments) {
        params.insert(info.name.clone(), var.as_tensor().clone());
        let shape = var.dims().to_vec();
        moments.insert(
            format!("m.{}", info.name),
            Tensor::from_slice(&st.m, shape.as_slice(), &Device::Cpu)?,
        );
        moments.insert(
            format!("v.{}", info.name),
            Tensor::from_slice(&st.v, shape.as_slice(), &Device::Cpu)?,
        );
    }
    stage.write(
        "params.safetensors",
        &safetensors_bytes(&params, DType::F32, None)?,
    )?;
    stage.write(
        "optimizer.safetensors",
        &safetensors_bytes(&moments, DType::F32, None)?,
    )?;
    let mut state = serde_json::to_value(pos)?;
    state["optimizer_step"] = json!(trainer.optimizer.step);
    stage.write_json("state.json", &state)?;
    stage.commit()?;
    // Older checkpoints are superseded once the new one is complete.
    for e in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
        let p = e.path();
        if p != dest
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(())
}

fn load_checkpoint(trainer: &mut Trainer, dir: &Path) -> Result<Position> {
    let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)
        .with_context(|| format!("{}: bad state.json", dir.display()))?;
    let pos: Position = serde_json::from_value(state.clone())
        .with_context(|| format!("{}: bad state.json", dir.display()))?;
    let params = candle_core::safetensors::load(dir.join("params.safetensors"), &Device::Cpu)?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    for ((info, var), st) in trainer
        .trainable
        .iter()
        .zip(trainer.optimizer.moments.iter_mut())
    {
        let get = |map: &std::collections::HashMap<String, Tensor>, key: &str| -> Result<Tensor> {
            let t = map
                .get(key)
                .ok_or_else(|| anyhow::anyhow!("{}: checkpoint lacks `{key}`", dir.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: `{key}` has shape {:?}, the model {:?}",
                    dir.display(),
                    t.dims(),
                    var.dims()
                );
            }
            Ok(t.clone())
        };
        var.set(&get(&params, &info.name)?)?;
        st.m = get(&moments, &format!("m.{}", info.name))?
            .flatten_all()?
            .to_vec1()?;
        st.v = get(&moments, &format!("v.{}", info.name))?
            .flatten_all()?
            .to_vec1()?;
    }
    trainer.optimizer.step = state["optimizer_step"]
        .as_u64()
        .unwrap_or(pos.global_step as u64);
    Ok(pos)
}
