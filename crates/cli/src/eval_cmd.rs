//! `safety-layers eval`: the paper's Table 2 columns for one or more models, or the same table
//! recomputed from an earlier run's saved responses with another judge (`--responses DIR`).

use crate::progress::Progress;
use anyhow::{bail, Result};
use serde_json::json;
use sl_engine::Template;
use sl_science::eval::report::{check_label, ModelRow};
use sl_science::eval::run::{self, EvalProgress, EvalSets, EvalSettings};
use sl_science::eval::EvalJudge;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model to evaluate, one table row each (repeat the flag): Hugging Face directory, .gguf file
    /// or catalog name, optionally as LABEL=MODEL to name the row
    #[arg(
        long = "model",
        required_unless_present = "responses",
        conflicts_with = "responses"
    )]
    pub models: Vec<String>,
    /// Re-judge the responses saved in an earlier eval output directory instead of generating
    /// (sets, models and generation settings come from DIR/eval.json); repeat the flag to
    /// merge several runs of the same settings into one table (needs --out)
    #[arg(long)]
    pub responses: Vec<PathBuf>,
    /// Harmful prompts for R_h (file or dataset name; `none` to skip)
    #[arg(long, default_value = "advbench")]
    pub harmful: String,
    /// Over-rejection queries D_o (file or dataset name; `none` to skip)
    #[arg(long, default_value = "over-rejection")]
    pub over_rejection: String,
    /// XSTest: the dataset name `xstest` (its safe and unsafe prompts, separately), a CSV with
    /// `prompt` and `label` (safe/unsafe) columns, or `none`
    #[arg(long, default_value = "xstest")]
    pub xstest: String,
    /// Fine-tuning records with reference outputs for Rouge-L and perplexity (JSON/JSONL with
    /// instruction, input, output; or dataset name; `none` to skip)
    #[arg(long, default_value = "finetune-normal")]
    pub utility: String,
    /// Held-out records to score: the last N of --utility, the ones `finetune` holds out
    #[arg(long, default_value_t = 100)]
    pub utility_n: usize,
    /// Which end of --utility the held-out records come from: last or first
    #[arg(long, default_value = "last")]
    pub utility_take: String,
    /// Refusal judge: union (gcg or xstest), gcg, xstest, or probe (first-token refusal mass,
    /// threshold calibrated against union on each model's responses, or against gcg with
    /// --refusal-list, unless --probe-threshold)
    #[arg(long, default_value = sl_science::judges::DEFAULT_JUDGE)]
    pub judge: String,
    /// Refusal phrases, one per line, instead of the judge's default list
    #[arg(long)]
    pub refusal_list: Option<PathBuf>,
    /// Fixed probe threshold (with --judge probe)
    #[arg(long)]
    pub probe_threshold: Option<f64>,
    /// New tokens per response to the judged sets
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// New tokens per response to the utility records
    #[arg(long, default_value_t = 128)]
    pub utility_max_new_tokens: usize,
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Positions per teacher-forced pass when scoring references (bounds the logits' memory)
    #[arg(long, default_value_t = 1024)]
    pub score_tokens: usize,
    /// Use only the first N prompts of each judged set
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output directory (with --responses: default DIR/rejudged-<judge>)
    // clap prints this doc comment as --help text, where `<judge>` is a placeholder, not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long, required_unless_present = "responses")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub load: crate::LoadArgs,
}

fn judge_of(a: &EvalArgs) -> Result<EvalJudge> {
    run::judge_of(&a.judge, a.refusal_list.as_deref(), a.probe_threshold)
}

fn eval_sets(a: &EvalArgs) -> EvalSets {
    EvalSets {
        harmful: a.harmful.clone(),
        over_rejection: a.over_rejection.clone(),
        xstest: a.xstest.clone(),
        utility: a.utility.clone(),
        utility_n: a.utility_n,
        utility_take: a.utility_take.clone(),
        limit: a.limit,
    }
}

/// The CLI's progress bars for `run::evaluate_model`'s stages.
#[derive(Default)]
struct Bars(Option<Progress>);

impl EvalProgress for Bars {
    fn start(&mut self, what: &str, total: usize) {
        self.0 = Some(Progress::new(total, what));
    }
    fn inc(&mut self, n: usize) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
    fn finish(&mut self, what: &str, prompts: usize, tokens: usize) -> f64 {
        self.0
            .take()
            .map(|b| b.finish(prompts, tokens, what))
            .unwrap_or(0.0)
    }
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    if !a.responses.is_empty() {
        return rejudge(a, &a.responses);
    }
    let out = a
        .out
        .as_ref()
        .expect("clap requires --out without --responses");
    let judge = judge_of(a)?;
    let settings = EvalSettings {
        template: a.template.parse::<Template>()?,
        max_new_tokens: a.max_new_tokens,
        utility_max_new_tokens: a.utility_max_new_tokens,
        batch_size: a.batch_size,
        score_tokens: a.score_tokens,
    };
    settings.check()?;
    // Every input is checked before any model is loaded.
    let data = crate::datasets::data_options();
    let sets = run::safety_sets(&eval_sets(a), &data)?;
    let util = run::utility_set(&eval_sets(a), &data)?;
    if sets.is_empty() && util.is_none() {
        bail!("nothing to evaluate: every set is `none`");
    }
    let mut labels = Vec::new();
    for m in &a.models {
        let (label, spec) = run::label_and_spec(m);
        check_label(&label)?;
        if labels.iter().any(|(l, _)| *l == label) {
            bail!("two models are labelled `{label}`; name them with LABEL=MODEL");
        }
        labels.push((label, spec));
    }
    let mut rows = Vec::new();
    let mut timings = serde_json::Map::new();
    for (label, spec) in &labels {
        let mut timing = serde_json::Map::new();
        let t = std::time::Instant::now();
        let row = crate::datasets::load_model(Path::new(spec)).and_then(|m| {
            timing.insert("load_seconds".into(), json!(t.elapsed().as_secs_f64()));
            run::evaluate_model(
                &m,
                &sets,
                util.as_ref(),
                &settings,
                &judge,
                label,
                &mut timing,
                &mut Bars::default(),
            )
        });
        let row = match row {
            Ok(mut r) => {
                r.model = spec.clone();
                r
            }
            Err(e) => {
                eprintln!("error: model `{label}` ({spec}): {e:#}");
                ModelRow::failed(label, spec, format!("{e:#}"))
            }
        };
        timing.insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
        timings.insert(label.clone(), serde_json::Value::Object(timing));
        rows.push(row);
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| r.label.clone())
        .collect();
    if failed.len() == rows.len() {
        bail!("no model could be evaluated ({})", failed.join(", "));
    }
    let report = run::report(&sets, util.as_ref(), &judge, &settings, a.limit, rows);
    report.write(out)?;
    let wall = t0.elapsed().as_secs_f64();
    let timing_doc = json!({
        "wall_seconds": wall, "models": timings,
        "note": "not part of eval.json, which stays byte-identical between runs",
    });
    sl_engine::io::atomic::write_atomic(
        &out.join("timings.json"),
        serde_json::to_string_pretty(&timing_doc)?.as_bytes(),
    )?;
    print!("{}", report.markdown()?);
    eprintln!(
        "wrote {}/eval.json, eval.csv, eval.md, eval.svg, responses/ ({wall:.1} s)",
        out.display()
    );
    if !failed.is_empty() {
        bail!(
            "{} of {} models failed: {} (their rows say why; the other rows are complete)",
            failed.len(),
            report.models.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn rejudge(a: &EvalArgs, dirs: &[PathBuf]) -> Result<()> {
    let judge = judge_of(a)?;
    let out = match (&a.out, dirs) {
        (Some(o), _) => o.clone(),
        (None, [dir]) => dir.join(format!("rejudged-{}", a.judge)),
        (None, _) => bail!(
            "--responses given {} times: name the merged table's --out",
            dirs.len()
        ),
    };
    if let Some(d) = dirs.iter().find(|d| **d == out) {
        bail!(
            "--out {}: re-judging writes a new directory; choose another than the one read",
            d.display()
        );
    }
    let paths: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let mut report = sl_science::eval::report::load_merged(&paths)?;
    report.rejudge(&judge)?;
    let dir = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    report.rejudged_from = Some(dir.clone());
    report.write(&out)?;
    print!("{}", report.markdown()?);
    eprintln!(
        "re-judged {dir} with {}; wrote {}/eval.json, eval.csv, eval.md, eval.svg, responses/",
        a.judge,
        out.display()
    );
    Ok(())
}
