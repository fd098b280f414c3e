//! `safety-layers eval`: the paper's Table 2 columns for one or more models, or the same table
//! recomputed from an earlier run's saved responses with another judge (`--responses DIR`).

use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use sl_catalog::datasets;
use sl_engine::{Model, PromptRecord, Template};
use sl_science::eval::report::{check_label, load, response_file, EvalReport, ModelRow, SetInfo};
use sl_science::eval::utility::{self, Take, UtilityOptions, UtilitySet};
use sl_science::eval::{generate_set, judge_responses, EvalJudge, GenOptions, SafetySet, SetKind};
use sl_science::schema::Precision;
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
    /// (sets, models and generation settings come from DIR/eval.json)
    #[arg(long)]
    pub responses: Option<PathBuf>,
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
    /// Refusal judge: gcg, xstest, or probe (first-token refusal mass, threshold calibrated
    /// against gcg on each model's responses unless --probe-threshold)
    #[arg(long, default_value = "gcg")]
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
    if let Some(t) = a.probe_threshold {
        if a.judge != "probe" {
            bail!("--probe-threshold applies to --judge probe only");
        }
        if !t.is_finite() {
            bail!("--probe-threshold {t}: must be a finite number");
        }
    }
    Ok(if a.judge == "probe" {
        EvalJudge::Probe {
            calibrate_against: crate::locate_cmd::judge_from("gcg", a.refusal_list.as_ref())?,
            threshold: a.probe_threshold,
        }
    } else {
        EvalJudge::Text(crate::locate_cmd::judge_from(
            &a.judge,
            a.refusal_list.as_ref(),
        )?)
    })
}

/// The judged sets named on the command line, each checked non-empty.
fn safety_sets(a: &EvalArgs) -> Result<Vec<SafetySet>> {
    let mut sets = Vec::new();
    let mut push = |kind: SetKind,
                    name: String,
                    sha256: String,
                    mut records: Vec<PromptRecord>|
     -> Result<()> {
        if let Some(n) = a.limit {
            records.truncate(n);
        }
        if records.is_empty() {
            bail!(
                "the {} set `{name}` is empty{}",
                kind.key(),
                if a.limit == Some(0) {
                    " (--limit 0)"
                } else {
                    ""
                }
            );
        }
        sets.push(SafetySet {
            kind,
            name,
            sha256,
            records,
        });
        Ok(())
    };
    for (kind, spec) in [
        (SetKind::Harmful, &a.harmful),
        (SetKind::OverRejection, &a.over_rejection),
    ] {
        if spec != "none" {
            let s = crate::datasets::prompt_set(spec)?;
            push(kind, s.name, s.sha256, s.records)?;
        }
    }
    if a.xstest != "none" {
        let path = Path::new(&a.xstest);
        if path.is_file() {
            let (safe, unsafe_) = sl_science::eval::read_xstest_csv(path)?;
            let sha = sl_catalog::sha256_file(path)?;
            push(
                SetKind::XstestSafe,
                format!("{}[label=safe]", a.xstest),
                sha.clone(),
                safe,
            )?;
            push(
                SetKind::XstestUnsafe,
                format!("{}[label=unsafe]", a.xstest),
                sha,
                unsafe_,
            )?;
        } else if a.xstest == "xstest" {
            for (kind, name) in [
                (SetKind::XstestSafe, "xstest-safe"),
                (SetKind::XstestUnsafe, "xstest-unsafe"),
            ] {
                let s = crate::datasets::prompt_set(name)?;
                push(kind, s.name, s.sha256, s.records)?;
            }
        } else {
            bail!(
                "--xstest `{}`: no such file; expected `xstest`, a CSV file with `prompt` and \
                 `label` columns, or `none`",
                a.xstest
            );
        }
    }
    Ok(sets)
}

fn utility_set(a: &EvalArgs) -> Result<Option<UtilitySet>> {
    if a.utility == "none" {
        return Ok(None);
    }
    let take: Take = a.utility_take.parse()?;
    let path = Path::new(&a.utility);
    let (records, sha) = if path.is_file() {
        (utility::read_records(path)?, sl_catalog::sha256_file(path)?)
    } else {
        let ds = datasets::dataset(&a.utility).ok_or_else(|| {
            anyhow!(
                "--utility `{}`: no such file, and {}",
                a.utility,
                datasets::unknown(&a.utility)
            )
        })?;
        let files = datasets::resolve(&ds, &crate::datasets::data_options())?;
        if files.len() != 1 {
            bail!(
                "--utility `{}`: a utility set must be one file of records with outputs",
                a.utility
            );
        }
        (
            utility::read_records(&files[0].path)
                .with_context(|| format!("dataset `{}`", a.utility))?,
            files[0].sha256.clone(),
        )
    };
    Ok(Some(UtilitySet::held_out(
        &a.utility,
        &sha,
        records,
        a.utility_n,
        take,
    )?))
}

/// `LABEL=MODEL`, or MODEL with a label made from its name.
fn label_and_spec(arg: &str) -> (String, String) {
    if let Some((l, m)) = arg.split_once('=') {
        if !l.is_empty() && !l.contains(['/', '\\']) && !m.is_empty() {
            return (l.to_string(), m.to_string());
        }
    }
    let p = Path::new(arg);
    let stem = if p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        p.file_stem()
    } else {
        p.file_name()
    };
    let base = stem
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| arg.to_string());
    let label: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        if label.is_empty() || label == "." || label == ".." {
            "model".into()
        } else {
            label
        },
        arg.to_string(),
    )
}

/// Responses of one model to every set, judged; `timing` collects seconds per step.
fn evaluate_model(
    model: &Model,
    sets: &[SafetySet],
    util: Option<&UtilitySet>,
    a: &EvalArgs,
    judge: &EvalJudge,
    label: &str,
    timing: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<ModelRow> {
    let template: Template = a.template.parse()?;
    let opts = GenOptions {
        template,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
    };
    let probe_ids = if judge.needs_probe_scores() {
        Some(sl_science::judges::probe::first_tokens(&model.tokenizer)?)
    } else {
        None
    };
    let mut judged = Vec::new();
    for s in sets {
        let bar = Progress::new(s.records.len(), &format!("{label}: {}", s.kind.key()));
        let rs = generate_set(model, s, &opts, probe_ids.as_deref(), &mut |k| bar.inc(k))
            .with_context(|| format!("{} set `{}`", s.kind.key(), s.name))?;
        let tokens: usize = rs.iter().map(|r| r.output_ids.len()).sum();
        let secs = bar.finish(
            rs.len(),
            tokens,
            &format!("{label}: {} (new tokens)", s.kind.key()),
        );
        timing.insert(
            s.kind.key().into(),
            json!({"seconds": secs, "new_tokens": tokens}),
        );
        judged.push((s.kind, rs));
    }
    let calibration = judge_responses(&mut judged, judge, &|k| response_file(label, k.key()))?;
    let utility = match util {
        Some(u) => {
            let bar = Progress::new(u.records.len(), &format!("{label}: utility"));
            let uo = UtilityOptions {
                template,
                max_new_tokens: a.utility_max_new_tokens,
                batch_size: a.batch_size,
                max_batch_tokens: a.score_tokens.max(1),
            };
            let rs = utility::evaluate(model, u, &uo, &mut |k| bar.inc(k))
                .with_context(|| format!("utility set `{}`", u.name))?;
            let tokens: usize = rs.iter().map(|r| r.output_ids.len()).sum();
            let secs = bar.finish(
                rs.len(),
                tokens,
                &format!("{label}: utility (new tokens; then references scored)"),
            );
            timing.insert(
                "utility".into(),
                json!({"seconds": secs, "new_tokens": tokens}),
            );
            Some(rs)
        }
        None => None,
    };
    Ok(ModelRow {
        label: label.into(),
        model: String::new(),
        precision: Some(Precision::of(model)),
        error: None,
        sets: judged,
        utility,
        calibration,
    })
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    if let Some(dir) = &a.responses {
        return rejudge(a, dir);
    }
    let out = a
        .out
        .as_ref()
        .expect("clap requires --out without --responses");
    let judge = judge_of(a)?;
    let template: Template = a.template.parse()?;
    if a.batch_size == 0 || a.max_new_tokens == 0 || a.utility_max_new_tokens == 0 {
        bail!("--batch-size, --max-new-tokens and --utility-max-new-tokens must be at least 1");
    }
    // Every input is checked before any model is loaded.
    let sets = safety_sets(a)?;
    let util = utility_set(a)?;
    if sets.is_empty() && util.is_none() {
        bail!("nothing to evaluate: every set is `none`");
    }
    let mut labels = Vec::new();
    for m in &a.models {
        let (label, spec) = label_and_spec(m);
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
            evaluate_model(&m, &sets, util.as_ref(), a, &judge, label, &mut timing)
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
    let report = EvalReport {
        settings: json!({
            "template": template.name(), "max_new_tokens": a.max_new_tokens,
            "utility_max_new_tokens": a.utility_max_new_tokens,
            "batch_size": a.batch_size, "limit": a.limit,
            "generation": "greedy, full responses (no early stop)",
        }),
        judge: judge.describe(),
        sets: sets
            .iter()
            .map(|s| SetInfo {
                kind: s.kind,
                name: s.name.clone(),
                sha256: s.sha256.clone(),
                prompts: s.records.len(),
            })
            .collect(),
        utility: util.as_ref().map(|u| u.describe()),
        rejudged_from: None,
        models: rows,
    };
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

fn rejudge(a: &EvalArgs, dir: &Path) -> Result<()> {
    let judge = judge_of(a)?;
    let mut report = load(dir)?;
    report.rejudge(&judge)?;
    report.rejudged_from = Some(dir.display().to_string());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| dir.join(format!("rejudged-{}", a.judge)));
    if out == dir {
        bail!(
            "--out {}: re-judging writes a new directory; choose another than the one read",
            out.display()
        );
    }
    report.write(&out)?;
    print!("{}", report.markdown()?);
    eprintln!(
        "re-judged {} with {}; wrote {}/eval.json, eval.csv, eval.md, eval.svg, responses/",
        dir.display(),
        a.judge,
        out.display()
    );
    Ok(())
}
