//! One evaluation end to end, for the front ends (the CLI's `eval`, the Python package's
//! `evaluate`): the sets named by the user resolved and checked, each model's responses
//! generated and judged, the report assembled.

use crate::eval::report::{EvalReport, ModelRow, SetInfo};
use crate::eval::utility::{self, Take, UtilityOptions, UtilitySet};
use crate::eval::{generate_set, judge_responses, EvalJudge, GenOptions, SafetySet, SetKind};
use crate::judges::Judge;
use crate::schema::Precision;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use sl_catalog::datasets::{self, DataOptions};
use sl_engine::{Model, PromptRecord, Template};
use std::path::Path;

/// The sets to evaluate on, as named by the user (`none` skips one).
#[derive(Debug, Clone)]
pub struct EvalSets {
    /// Harmful prompts for R_h (file or dataset name).
    pub harmful: String,
    /// Over-rejection queries D_o (file or dataset name).
    pub over_rejection: String,
    /// `xstest`, a CSV with `prompt` and `label` columns, or `none`.
    pub xstest: String,
    /// Records with reference outputs for Rouge-L and perplexity (file or dataset name).
    pub utility: String,
    pub utility_n: usize,
    /// `last` or `first`.
    pub utility_take: String,
    /// Only the first N prompts of each judged set.
    pub limit: Option<usize>,
}

/// Generation settings of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub template: Template,
    pub max_new_tokens: usize,
    pub utility_max_new_tokens: usize,
    pub batch_size: usize,
    /// Positions per teacher-forced pass when scoring references.
    pub score_tokens: usize,
}

impl EvalSettings {
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.max_new_tokens == 0 || self.utility_max_new_tokens == 0 {
            bail!("--batch-size, --max-new-tokens and --utility-max-new-tokens must be at least 1");
        }
        Ok(())
    }
}

/// A front end's progress display: a stage (`what`, `total` items) starts, advances, finishes.
pub trait EvalProgress {
    fn start(&mut self, what: &str, total: usize);
    fn inc(&mut self, n: usize);
    /// The stage is done: `prompts` answered with `tokens` new tokens. Returns its seconds.
    fn finish(&mut self, what: &str, prompts: usize, tokens: usize) -> f64;
}

/// The judge by name: `gcg`, `xstest`, or `probe` (first-token refusal mass, threshold given or
/// calibrated against gcg on each model's responses).
pub fn judge_of(
    judge: &str,
    refusal_list: Option<&Path>,
    probe_threshold: Option<f64>,
) -> Result<EvalJudge> {
    if let Some(t) = probe_threshold {
        if judge != "probe" {
            bail!("--probe-threshold applies to --judge probe only");
        }
        if !t.is_finite() {
            bail!("--probe-threshold {t}: must be a finite number");
        }
    }
    Ok(if judge == "probe" {
        EvalJudge::Probe {
            calibrate_against: Judge::probe_reference(refusal_list)?,
            threshold: probe_threshold,
        }
    } else {
        EvalJudge::Text(Judge::named(judge, refusal_list)?)
    })
}

/// The judged sets named, each checked non-empty.
pub fn safety_sets(a: &EvalSets, data: &DataOptions) -> Result<Vec<SafetySet>> {
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
    let prompt_set = |spec: &str| crate::inputs::prompt_set(spec, None, data);
    for (kind, spec) in [
        (SetKind::Harmful, &a.harmful),
        (SetKind::OverRejection, &a.over_rejection),
    ] {
        if spec != "none" {
            let s = prompt_set(spec)?;
            push(kind, s.name, s.sha256, s.records)?;
        }
    }
    if a.xstest != "none" {
        let path = Path::new(&a.xstest);
        if path.is_file() {
            let (safe, unsafe_) = crate::eval::read_xstest_csv(path)?;
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
                let s = prompt_set(name)?;
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

/// The held-out utility records named, if any.
pub fn utility_set(a: &EvalSets, data: &DataOptions) -> Result<Option<UtilitySet>> {
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
        let files = datasets::resolve(&ds, data)?;
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
pub fn label_and_spec(arg: &str) -> (String, String) {
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
#[allow(clippy::too_many_arguments)]
pub fn evaluate_model(
    model: &Model,
    sets: &[SafetySet],
    util: Option<&UtilitySet>,
    s: &EvalSettings,
    judge: &EvalJudge,
    label: &str,
    timing: &mut serde_json::Map<String, serde_json::Value>,
    progress: &mut dyn EvalProgress,
) -> Result<ModelRow> {
    let opts = GenOptions {
        template: s.template,
        max_new_tokens: s.max_new_tokens,
        batch_size: s.batch_size,
    };
    // Probe scores under every judge (one more pass over each prompt): the report compares the
    // probe with the keyword rules on the same responses. A tokenizer without the probe's first
    // tokens fails only the probe judge.
    let probe_ids = match crate::judges::probe::first_tokens(&model.tokenizer) {
        Ok(ids) => Some(ids),
        Err(e) if judge.needs_probe_scores() => return Err(e),
        Err(_) => None,
    };
    let mut judged = Vec::new();
    for set in sets {
        progress.start(&format!("{label}: {}", set.kind.key()), set.records.len());
        let rs = generate_set(model, set, &opts, probe_ids.as_deref(), &mut |k| {
            progress.inc(k)
        })
        .with_context(|| format!("{} set `{}`", set.kind.key(), set.name))?;
        let tokens: usize = rs.iter().map(|r| r.output_ids.len()).sum();
        let secs = progress.finish(
            &format!("{label}: {} (new tokens)", set.kind.key()),
            rs.len(),
            tokens,
        );
        timing.insert(
            set.kind.key().into(),
            json!({"seconds": secs, "new_tokens": tokens}),
        );
        judged.push((set.kind, rs));
    }
    let calibration = judge_responses(&mut judged, judge, &|k| {
        crate::eval::report::response_file(label, k.key())
    })?;
    let utility = match util {
        Some(u) => {
            progress.start(&format!("{label}: utility"), u.records.len());
            let uo = UtilityOptions {
                template: s.template,
                max_new_tokens: s.utility_max_new_tokens,
                batch_size: s.batch_size,
                max_batch_tokens: s.score_tokens.max(1),
            };
            let rs = utility::evaluate(model, u, &uo, &mut |k| progress.inc(k))
                .with_context(|| format!("utility set `{}`", u.name))?;
            let tokens: usize = rs.iter().map(|r| r.output_ids.len()).sum();
            let secs = progress.finish(
                &format!("{label}: utility (new tokens; then references scored)"),
                rs.len(),
                tokens,
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

/// The report of an evaluation's rows.
pub fn report(
    sets: &[SafetySet],
    util: Option<&UtilitySet>,
    judge: &EvalJudge,
    s: &EvalSettings,
    limit: Option<usize>,
    rows: Vec<ModelRow>,
) -> EvalReport {
    EvalReport {
        settings: json!({
            "template": s.template.name(), "max_new_tokens": s.max_new_tokens,
            "utility_max_new_tokens": s.utility_max_new_tokens,
            "batch_size": s.batch_size, "limit": limit,
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
        utility: util.map(|u| u.describe()),
        rejudged_from: None,
        models: rows,
    }
}
