//! The paper's analyses: the same science functions, settings and output files as the CLI's
//! `cosine`, `locate` and `finetune`, returning what they write as JSON-shaped dicts (the
//! Python package turns them into dataclasses).

use crate::convert::{json_to_py, parse, PromptsArg};
use crate::model::PyModel;
use crate::{run_detached, to_py_err, Progress};
use anyhow::{anyhow, bail};
use pyo3::prelude::*;
use sl_catalog::datasets::DataOptions;
use sl_engine::{LayerRange, Template};
use sl_science::cosine::file::CosineFile;
use sl_science::cosine::report::{analyse, CosineConfig};
use sl_science::cosine::Pairs;
use sl_science::eval::report::{check_label, ModelRow};
use sl_science::eval::run::{self, EvalProgress, EvalSets, EvalSettings};
use sl_science::finetune::freeze::FreezeModule;
use sl_science::finetune::{FinetuneConfig, RunOptions};
use sl_science::inputs::{self, ModelSource};
use sl_science::judges::Judge;
use sl_science::locate::file::LocateMeta;
use sl_science::locate::{AlphaMode, LocateConfig, Locator};
use sl_science::schema::Precision;
use std::path::PathBuf;

/// The cosine analysis (existence of safety layers); writes cosine.json/.csv/.svg and
/// angle_gap.svg into `out` when given. Returns cosine.json's contents.
#[pyfunction]
#[pyo3(signature = (model, normal=None, malicious=None, template="alpaca", pairs="500", seed=0,
                    compare=None, batch_size=16, out=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn cosine<'py>(
    py: Python<'py>,
    model: PyRef<'py, PyModel>,
    normal: Option<PromptsArg>,
    malicious: Option<PromptsArg>,
    template: &str,
    pairs: &str,
    seed: u64,
    compare: Option<PyRef<'py, PyModel>>,
    batch_size: usize,
    out: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let bar = Progress::new(progress);
    let main: &PyModel = &model;
    let other: Option<&PyModel> = compare.as_deref();
    let doc = run_detached(py, || {
        let cfg = CosineConfig {
            template: parse::<Template>(template)?,
            pairs: parse::<Pairs>(pairs)?,
            seed,
            batch_size,
        };
        let data = DataOptions::from_env();
        let set = |arg: &Option<PromptsArg>, default: &str, what: &str| match arg {
            Some(a) => a.resolve(what),
            None => inputs::prompt_set(default, None, &data),
        };
        let normal = set(&normal, "paper-normal", "normal")?;
        let malicious = set(&malicious, "paper-malicious", "malicious")?;
        let mut runs = Vec::new();
        for m in std::iter::once(main).chain(other) {
            runs.push(analyse(
                &m.inner,
                &m.spec,
                &normal,
                &malicious,
                &cfg,
                &mut |k| bar.tick(k, None),
            )?);
        }
        if let Some(dir) = &out {
            sl_science::cosine::report::write(
                dir,
                &runs[0],
                runs.get(1),
                &normal,
                &malicious,
                &cfg,
            )?;
        }
        let file = CosineFile::new(&runs[0], runs.get(1), &normal, &malicious, &cfg);
        Ok(serde_json::to_value(&file)?)
    })?;
    json_to_py(py, &doc)
}

/// The localisation sweep (scale layer ranges, count over-rejections); writes locate.json,
/// .csv, .svg and responses/ into `out` when given. Returns locate.json's contents.
#[pyfunction]
#[pyo3(signature = (model, over_rejection=None, initial=None, cosine=None, alpha="auto",
                    std_threshold=15.0, judge="union", refusal_list=None, max_new_tokens=16,
                    span=2, batch_size=32, template="alpaca", limit=None, prefix_cache=false,
                    early_stop=true, out=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn locate<'py>(
    py: Python<'py>,
    mut model: PyRefMut<'py, PyModel>,
    over_rejection: Option<PromptsArg>,
    initial: Option<String>,
    cosine: Option<PathBuf>,
    alpha: &str,
    std_threshold: f64,
    judge: &str,
    refusal_list: Option<PathBuf>,
    max_new_tokens: usize,
    span: usize,
    batch_size: usize,
    template: &str,
    limit: Option<usize>,
    prefix_cache: bool,
    early_stop: bool,
    out: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    if let Some((r, a)) = model.scaled {
        return Err(to_py_err(anyhow!(
            "the model is scaled (layers {r} by {a}); locate scales it itself, so call it \
             outside a scaled() context"
        )));
    }
    let bar = Progress::new(progress);
    let pm: &mut PyModel = &mut model;
    let doc = run_detached(py, || {
        let n_layers = pm.inner.cfg().num_layers;
        let initial = match (&initial, &cosine) {
            (Some(_), Some(_)) => {
                bail!("give the initial range by `initial` or `cosine`, not both")
            }
            (Some(s), None) => LayerRange::parse(s, n_layers)?,
            (None, Some(p)) => CosineFile::initial_range(p, n_layers)?,
            (None, None) => {
                bail!("give the initial range with initial=\"I-J\" or cosine=\"DIR/cosine.json\"")
            }
        };
        let alpha = AlphaMode::parse(alpha, std_threshold)?;
        // The probe judges without generating; its threshold is calibrated against a text judge.
        let probe = judge == "probe";
        let judge = if probe {
            Judge::probe_reference(refusal_list.as_deref())?
        } else {
            Judge::named(judge, refusal_list.as_deref())?
        };
        let mut set = match &over_rejection {
            Some(a) => a.resolve("over_rejection")?,
            None => inputs::prompt_set("over-rejection", None, &DataOptions::from_env())?,
        };
        if let Some(n) = limit {
            set.records.truncate(n);
        }
        if set.records.is_empty() {
            bail!("the over-rejection set `{}` is empty", set.name);
        }
        let precision = Precision::of(&pm.inner);
        let prompts = pm
            .inner
            .prompts(&set.records, parse::<Template>(template)?)?;
        let cfg = LocateConfig {
            alpha,
            span,
            max_new_tokens,
            batch_size,
            prefix_cache,
            early_stop,
            probe,
            scale_target: sl_engine::ScaleTarget::Weights,
        };
        let meta = LocateMeta {
            model: pm.spec.clone(),
            precision: Some(precision),
            over_rejection: set.name.clone(),
            over_rejection_sha256: set.sha256.clone(),
            template: template.to_string(),
            max_new_tokens,
            span,
            prefix_cache,
            early_stop,
            scale_target: sl_engine::ScaleTarget::Weights,
            scaling_notes: pm.inner.decoder.weight_scaling_notes(),
        };
        let mut loc = Locator::new(&mut pm.inner, prompts, judge, cfg)?;
        let res =
            sl_science::locate::report::run(&mut loc, initial, alpha, &mut |k| bar.tick(k, None));
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                loc.model.decoder.restore_scaling();
                return Err(e);
            }
        };
        if let Some(dir) = &out {
            sl_science::locate::report::write(dir, &loc, &res, initial, meta.clone())?;
        }
        let file = sl_science::locate::report::locate_file(&loc, &res, initial, meta);
        loc.model.decoder.restore_scaling();
        Ok(serde_json::to_value(&file)?)
    });
    // An interrupt unwinds out of a scaled run: the weights go back whatever happened.
    pm.inner.decoder.restore_scaling();
    json_to_py(py, &doc?)
}

/// Fine-tuning (SPPFT with `freeze`, full fine-tuning without); writes the model, finetune.json
/// and the log into `out` as the CLI does. Returns finetune.json's contents.
#[pyfunction]
#[pyo3(signature = (model, data, out, freeze=None, freeze_from=None,
                    freeze_modules=vec!["attn".to_string(), "mlp".to_string()], epochs=3,
                    lr=1e-4, lr_schedule="linear", warmup_steps=100, batch_size=4, grad_accum=1,
                    max_len=256, weight_decay=0.0, max_grad_norm=1.0, template="alpaca",
                    train_on_inputs=true, holdout=100, limit=None, seed=42, shuffle=true,
                    max_steps=None, save_every=None, resume=false, keep_checkpoints=false,
                    grad_checkpointing=false, freeze_embeddings=false, mixed_precision="no",
                    dtype="auto",
                    device=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn finetune<'py>(
    py: Python<'py>,
    model: PathBuf,
    data: String,
    out: PathBuf,
    freeze: Option<String>,
    freeze_from: Option<PathBuf>,
    freeze_modules: Vec<String>,
    epochs: usize,
    lr: f64,
    lr_schedule: &str,
    warmup_steps: usize,
    batch_size: usize,
    grad_accum: usize,
    max_len: usize,
    weight_decay: f64,
    max_grad_norm: f64,
    template: &str,
    train_on_inputs: bool,
    holdout: usize,
    limit: Option<usize>,
    seed: u64,
    shuffle: bool,
    max_steps: Option<usize>,
    save_every: Option<usize>,
    resume: bool,
    keep_checkpoints: bool,
    grad_checkpointing: bool,
    freeze_embeddings: bool,
    mixed_precision: &str,
    dtype: &str,
    device: Option<&str>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let bar = Progress::new(progress);
    let doc = run_detached(py, || {
        let src = ModelSource {
            models: sl_catalog::models::ModelOptions::from_env(),
            dtype: None,
            device: device.map(parse).transpose()?,
            tune_malloc: false,
        };
        // The modules are checked before minutes of loading.
        FreezeModule::parse_list(&freeze_modules)?;
        let m = inputs::load_model(&model, &src, true)?;
        let layers = m.cfg().num_layers;
        let freeze = match (&freeze, &freeze_from) {
            (Some(_), Some(_)) => bail!("give `freeze` or `freeze_from`, not both"),
            (Some(s), None) => Some(LayerRange::parse(s, layers)?),
            (None, Some(p)) => Some(sl_science::locate::file::LocateFile::read_range(p, layers)?),
            (None, None) => None,
        };
        let (mut records, data_desc) = inputs::training_data(&data, &DataOptions::from_env())?;
        if let Some(n) = limit {
            records.truncate(n);
        }
        let cfg = FinetuneConfig {
            model: model.display().to_string(),
            data: data_desc,
            freeze,
            freeze_modules: freeze_modules.clone(),
            epochs,
            lr,
            lr_schedule: parse(lr_schedule)?,
            warmup_steps,
            batch_size,
            grad_accum,
            max_len,
            weight_decay,
            max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
            template: parse::<Template>(template)?,
            train_on_inputs,
            holdout,
            seed,
            shuffle,
            grad_checkpointing,
            freeze_embeddings,
            train_layers: None,
            bf16_mixed: sl_science::finetune::parse_mixed_precision(mixed_precision)?,
            max_steps,
            dtype: dtype.to_string(),
        };
        let run = RunOptions {
            resume,
            save_every,
            keep_checkpoints,
            abort_after_step: None,
        };
        let summary = sl_science::finetune::finetune(m, &records, &cfg, &run, &out, &mut |s| {
            bar.tick(
                1,
                Some(format!(
                    "epoch {:.2} loss {:.4} lr {:.2e}",
                    s.epoch, s.loss, s.lr
                )),
            )
        })?;
        Ok(summary.json)
    })?;
    json_to_py(py, &doc)
}

/// The stages of an evaluation on one progress callback: `(n, stage)` with the stage's name.
struct EvalTicks<'a> {
    bar: &'a Progress,
    stage: String,
    started: std::time::Instant,
}

impl EvalProgress for EvalTicks<'_> {
    fn start(&mut self, what: &str, _total: usize) {
        self.stage = what.to_string();
        self.started = std::time::Instant::now();
        self.bar.tick(0, Some(self.stage.clone()));
    }
    fn inc(&mut self, n: usize) {
        self.bar.tick(n, Some(self.stage.clone()));
    }
    fn finish(&mut self, _what: &str, _prompts: usize, _tokens: usize) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// The paper's Table 2 columns for each `(label, model)`; writes eval.json, .csv, .md, .svg and
/// responses/ into `out` when given. Returns `{"eval": eval.json, "csv": eval.csv,
/// "markdown": eval.md}`.
#[pyfunction]
#[pyo3(signature = (models, harmful="advbench", over_rejection="over-rejection",
                    xstest="xstest", utility="finetune-normal", utility_n=100,
                    utility_take="last", judge="union", refusal_list=None, probe_threshold=None,
                    max_new_tokens=64, utility_max_new_tokens=128, template="alpaca",
                    batch_size=32, score_tokens=1024, limit=None, out=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn evaluate<'py>(
    py: Python<'py>,
    models: Vec<(String, PyRef<'py, PyModel>)>,
    harmful: &str,
    over_rejection: &str,
    xstest: &str,
    utility: &str,
    utility_n: usize,
    utility_take: &str,
    judge: &str,
    refusal_list: Option<PathBuf>,
    probe_threshold: Option<f64>,
    max_new_tokens: usize,
    utility_max_new_tokens: usize,
    template: &str,
    batch_size: usize,
    score_tokens: usize,
    limit: Option<usize>,
    out: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let bar = Progress::new(progress);
    let models: Vec<(String, &PyModel)> = models.iter().map(|(l, m)| (l.clone(), &**m)).collect();
    let doc = run_detached(py, || {
        if models.is_empty() {
            bail!("no models to evaluate");
        }
        let judge = run::judge_of(judge, refusal_list.as_deref(), probe_threshold)?;
        let settings = EvalSettings {
            template: parse::<Template>(template)?,
            max_new_tokens,
            utility_max_new_tokens,
            batch_size,
            score_tokens,
        };
        settings.check()?;
        let names = EvalSets {
            harmful: harmful.into(),
            over_rejection: over_rejection.into(),
            xstest: xstest.into(),
            utility: utility.into(),
            utility_n,
            utility_take: utility_take.into(),
            limit,
        };
        let data = DataOptions::from_env();
        let sets = run::safety_sets(&names, &data)?;
        let util = run::utility_set(&names, &data)?;
        if sets.is_empty() && util.is_none() {
            bail!("nothing to evaluate: every set is `none`");
        }
        let mut rows = Vec::new();
        for (label, m) in &models {
            // Unlabelled: named from the model as the CLI names `--model M`.
            let label = if label.is_empty() {
                run::label_and_spec(&m.spec).0
            } else {
                label.clone()
            };
            let label = &label;
            check_label(label)?;
            if rows.iter().any(|r: &ModelRow| r.label == *label) {
                bail!("two models are labelled `{label}`; give each its own label");
            }
            let mut ticks = EvalTicks {
                bar: &bar,
                stage: String::new(),
                started: std::time::Instant::now(),
            };
            let mut timing = serde_json::Map::new();
            let mut row = run::evaluate_model(
                &m.inner,
                &sets,
                util.as_ref(),
                &settings,
                &judge,
                label,
                &mut timing,
                &mut ticks,
            )?;
            row.model = m.spec.clone();
            rows.push(row);
        }
        let report = run::report(&sets, util.as_ref(), &judge, &settings, limit, rows);
        if let Some(dir) = &out {
            report.write(dir)?;
        }
        Ok(serde_json::json!({
            "eval": serde_json::to_value(report.to_file()?)?,
            "csv": report.csv()?,
            "markdown": report.markdown()?,
        }))
    })?;
    json_to_py(py, &doc)
}
