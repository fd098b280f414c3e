//! Checkpoints a killed run resumes from to the same final weights: the trainable parameters,
//! the AdamW moments and where the run stands, under `checkpoints/step-NNNNNNNN/`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sl_engine::io::atomic::StagedDir;
use sl_engine::io::hf_dir::{write_safetensors, Values};
use sl_engine::train::trainer::Trainer;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where the run stands, saved in every checkpoint's `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Of the settings and data (`FinetuneConfig::fingerprint`): a resumed run must agree.
    pub fingerprint: String,
    pub global_step: usize,
    pub epoch: usize,
    /// Next optimizer step within the epoch.
    pub step_in_epoch: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// Every line of `train_log.jsonl` so far.
    pub log: Vec<Value>,
}

impl Checkpoint {
    /// The start of a fresh run.
    pub fn start(fingerprint: String) -> Checkpoint {
        Checkpoint {
            fingerprint,
            global_step: 0,
            epoch: 0,
            step_in_epoch: 0,
            tokens: 0,
            seconds: 0.0,
            log: vec![],
        }
    }
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The newest complete checkpoint under `out`.
pub fn latest(out: &Path) -> Option<PathBuf> {
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

/// Writes the checkpoint of step `ckpt.global_step`, then removes the older ones.
pub fn save(trainer: &Trainer, ckpt: &Checkpoint, out: &Path) -> Result<()> {
    let dir = checkpoints_dir(out);
    std::fs::create_dir_all(&dir)?;
    let dest = dir.join(format!("step-{:08}", ckpt.global_step));
    let stage = StagedDir::new(&dest)?;
    let mut params = BTreeMap::new();
    let mut moments = BTreeMap::new();
    let host = trainer.optimizer.host_moments()?;
    for ((info, var), st) in trainer.trainable.iter().zip(&host) {
        params.insert(info.name.clone(), Values::Tensor(var.as_tensor()));
        let shape = var.dims().to_vec();
        moments.insert(
            format!("m.{}", info.name),
            Values::F32(&st.m, shape.clone()),
        );
        moments.insert(format!("v.{}", info.name), Values::F32(&st.v, shape));
    }
    // Streamed to the files: the moments are twice the model, and a checkpoint is written in
    // the middle of a run, on top of its peak.
    write_safetensors(
        &stage.path().join("params.safetensors"),
        &params,
        DType::F32,
        None,
    )?;
    write_safetensors(
        &stage.path().join("optimizer.safetensors"),
        &moments,
        DType::F32,
        None,
    )?;
    let mut state = serde_json::to_value(ckpt)?;
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
            let _ = sl_engine::io::atomic::remove_dir(&p);
        }
    }
    Ok(())
}

/// What a checkpoint directory holds: `state.json` (raw and typed) and the two tensor files.
pub struct Stored {
    pub state: Value,
    pub ckpt: Checkpoint,
    pub params: HashMap<String, Tensor>,
    pub moments: HashMap<String, Tensor>,
}

/// Reads the checkpoint in `dir` without a model to put it in; errors name the file.
pub fn read_dir(dir: &Path) -> Result<Stored> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: bad state.json", dir.display()))?;
    let ckpt: Checkpoint = serde_json::from_value(state.clone())
        .with_context(|| format!("{}: bad state.json", dir.display()))?;
    let tensors = |name: &str| {
        let p = dir.join(name);
        candle_core::safetensors::load(&p, &Device::Cpu)
            .with_context(|| format!("{}: not a readable safetensors file", p.display()))
    };
    Ok(Stored {
        params: tensors("params.safetensors")?,
        moments: tensors("optimizer.safetensors")?,
        state,
        ckpt,
    })
}

/// Puts the checkpoint in `dir` into `trainer` and returns where the run stood; refuses one
/// written with other settings than `fingerprint`'s.
pub fn resume(trainer: &mut Trainer, dir: &Path, fingerprint: &str) -> Result<Checkpoint> {
    let Stored {
        state,
        ckpt,
        params,
        moments,
    } = read_dir(dir)?;
    for ((info, var), st) in trainer
        .trainable
        .iter()
        .zip(trainer.optimizer.moments.iter_mut())
    {
        let get = |map: &HashMap<String, Tensor>, key: &str| -> Result<Tensor> {
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
        .unwrap_or(ckpt.global_step as u64);
    if ckpt.fingerprint != fingerprint {
        bail!(
            "--resume: {} was written by a run with different settings or data; start a new run \
             in a new directory",
            dir.display()
        );
    }
    Ok(ckpt)
}
