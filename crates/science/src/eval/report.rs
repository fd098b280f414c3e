//! The evaluation table and its files: eval.json (stable keys, no timings, so the same command
//! gives the same bytes), eval.csv and eval.md (models as rows, the layout of the paper's
//! Table 2), eval.svg, and `responses/<model>/<set>.jsonl` with every verdict. `load` reads
//! such a directory back so the tables can be recomputed with another judge without the models.

use crate::eval::file::{EvalFile, EvalModel, EvalRow, FailedRow, SetFileInfo, SCHEMA_VERSION};
use crate::eval::rouge::rouge_l;
use crate::eval::utility::{self, UtilityResponse, UtilitySummary};
use crate::eval::{judge_responses, summarise, EvalJudge, SafetyResponse, SetKind, SetSummary};
use crate::judges::probe::Calibration;
use crate::schema::Precision;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sl_engine::io::atomic::write_atomic;
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT: &str = "safety-layers eval 1";

/// A prompt set of the table and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SetInfo {
    pub kind: SetKind,
    pub name: String,
    pub sha256: String,
    pub prompts: usize,
}

/// One model's row: its responses (judged), or why it could not be evaluated.
#[derive(Debug, Clone)]
pub struct ModelRow {
    /// Row name and directory name under responses/.
    pub label: String,
    /// The model as given on the command line.
    pub model: String,
    /// How it computed; None for a failed row, or a re-judged file that did not record it.
    pub precision: Option<Precision>,
    pub error: Option<String>,
    pub sets: Vec<(SetKind, Vec<SafetyResponse>)>,
    pub utility: Option<Vec<UtilityResponse>>,
    pub calibration: Option<Calibration>,
}

impl ModelRow {
    pub fn failed(label: &str, model: &str, error: String) -> ModelRow {
        ModelRow {
            label: label.into(),
            model: model.into(),
            precision: None,
            error: Some(error),
            sets: vec![],
            utility: None,
            calibration: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Generation settings (template, token limits, batch size, limits).
    pub settings: Value,
    pub judge: Value,
    pub sets: Vec<SetInfo>,
    /// `UtilitySet::describe()`, when utility was evaluated.
    pub utility: Option<Value>,
    /// The directory whose saved responses were re-judged.
    pub rejudged_from: Option<String>,
    pub models: Vec<ModelRow>,
}

/// A label usable as a directory name: ASCII letters, digits, `.`, `_`, `-`.
pub fn check_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label != "."
        && label != ".."
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        bail!(
            "model label `{label}`: use ASCII letters, digits, `.`, `_` or `-` (it names a \
             directory under responses/)"
        );
    }
    Ok(())
}

pub fn response_file(label: &str, kind: &str) -> String {
    format!("responses/{label}/{kind}.jsonl")
}

/// A model's summaries, in table order.
pub struct RowSummary {
    pub sets: Vec<(SetKind, SetSummary)>,
    pub utility: Option<UtilitySummary>,
}

impl EvalReport {
    fn set_name(&self, kind: SetKind) -> &str {
        self.sets
            .iter()
            .find(|s| s.kind == kind)
            .map(|s| s.name.as_str())
            .unwrap_or("")
    }

    pub fn summaries(&self, row: &ModelRow) -> Result<RowSummary> {
        let sets = row
            .sets
            .iter()
            .map(|(k, rs)| Ok((*k, summarise(*k, self.set_name(*k), rs)?)))
            .collect::<Result<_>>()?;
        let utility = row.utility.as_deref().map(utility::summarise).transpose()?;
        Ok(RowSummary { sets, utility })
    }

    /// What eval.json holds.
    pub fn to_file(&self) -> Result<EvalFile> {
        let mut models = Vec::new();
        for row in &self.models {
            if let Some(error) = &row.error {
                models.push(EvalModel::Failed(FailedRow {
                    label: row.label.clone(),
                    model: row.model.clone(),
                    error: error.clone(),
                }));
                continue;
            }
            let s = self.summaries(row)?;
            let mut responses = BTreeMap::new();
            for (k, _) in &row.sets {
                responses.insert(k.key().into(), response_file(&row.label, k.key()));
            }
            if row.utility.is_some() {
                responses.insert("utility".into(), response_file(&row.label, "utility"));
            }
            let mut r = EvalRow {
                label: row.label.clone(),
                model: row.model.clone(),
                precision: row.precision.clone(),
                error: (),
                harmful: None,
                over_rejection: None,
                xstest_safe: None,
                xstest_unsafe: None,
                utility: s.utility,
                probe_calibration: row.calibration.clone(),
                responses,
            };
            for (k, sum) in s.sets {
                *r.set_mut(k) = Some(sum);
            }
            models.push(EvalModel::Ok(Box::new(r)));
        }
        let sets = self
            .sets
            .iter()
            .map(|s| {
                let info = SetFileInfo {
                    name: s.name.clone(),
                    sha256: s.sha256.clone(),
                    prompts: s.prompts,
                    metric: s.kind.metric().into(),
                };
                (s.kind.key().to_string(), info)
            })
            .collect();
        Ok(EvalFile {
            schema_version: SCHEMA_VERSION,
            format: FORMAT.into(),
            settings: self.settings.clone(),
            judge: self.judge.clone(),
            sets,
            utility: self.utility.clone(),
            rejudged_from: self.rejudged_from.clone(),
            models,
        })
    }

    /// Writes eval.json, eval.csv, eval.md, eval.svg and every response file into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        // An earlier run's eval.json would vouch for a directory whose files are being replaced;
        // a kill from here on leaves no eval.json, and a rerun writes everything again.
        match std::fs::remove_file(dir.join("eval.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e)
                    .with_context(|| format!("cannot replace {}/eval.json", dir.display()))
            }
            _ => {}
        }
        for row in self.models.iter().filter(|r| r.error.is_none()) {
            check_label(&row.label)?;
            for (k, rs) in &row.sets {
                write_jsonl(&dir.join(response_file(&row.label, k.key())), rs)?;
            }
            if let Some(u) = &row.utility {
                write_jsonl(&dir.join(response_file(&row.label, "utility")), u)?;
            }
        }
        let doc = self.to_file()?.to_pretty()?;
        write_atomic(&dir.join("eval.csv"), self.csv()?.as_bytes())?;
        write_atomic(&dir.join("eval.md"), self.markdown()?.as_bytes())?;
        write_atomic(
            &dir.join("eval.svg"),
            crate::eval::figure::bars_svg(self)?.as_bytes(),
        )?;
        // Last, so a complete eval.json means a complete directory.
        write_atomic(&dir.join("eval.json"), doc.as_bytes())?;
        Ok(())
    }

    pub fn csv(&self) -> Result<String> {
        let mut head = vec!["label".to_string(), "model".into(), "status".into()];
        for k in SetKind::ALL {
            for c in [
                "set",
                "n",
                "count",
                "rate",
                "ci95_low",
                "ci95_high",
                "empty",
            ] {
                head.push(format!("{}_{c}", k.key()));
            }
        }
        head.extend(["utility_records", "rouge_l_f1", "perplexity", "error"].map(String::from));
        let mut out = head.join(",") + "\n";
        for row in &self.models {
            let mut cells = vec![
                row.label.clone(),
                row.model.clone(),
                if row.error.is_some() { "failed" } else { "ok" }.into(),
            ];
            let s = if row.error.is_none() {
                Some(self.summaries(row)?)
            } else {
                None
            };
            for k in SetKind::ALL {
                match s
                    .as_ref()
                    .and_then(|s| s.sets.iter().find(|(sk, _)| *sk == k))
                {
                    Some((_, x)) => cells.extend([
                        x.set.clone(),
                        x.rate.n.to_string(),
                        x.rate.count.to_string(),
                        x.rate.rate.to_string(),
                        x.rate.ci95_low.to_string(),
                        x.rate.ci95_high.to_string(),
                        x.empty.to_string(),
                    ]),
                    None => cells.extend(std::iter::repeat_n(String::new(), 7)),
                }
            }
            match s.as_ref().and_then(|s| s.utility.as_ref()) {
                Some(u) => cells.extend([
                    u.records.to_string(),
                    u.rouge_l_f1.to_string(),
                    u.perplexity.map(|p| p.to_string()).unwrap_or_default(),
                ]),
                None => cells.extend(std::iter::repeat_n(String::new(), 3)),
            }
            cells.push(row.error.clone().unwrap_or_default());
            out += &cells
                .iter()
                .map(|c| csv_field(c))
                .collect::<Vec<_>>()
                .join(",");
            out.push('\n');
        }
        Ok(out)
    }

    pub fn markdown(&self) -> Result<String> {
        let kinds: Vec<SetKind> = self.sets.iter().map(|s| s.kind).collect();
        let mut md = String::from("# Evaluation\n\n");
        md += &format!("Judge: {}. ", judge_line(&self.judge));
        if let Some(r) = &self.rejudged_from {
            md += &format!("Re-judged from the responses saved in `{r}`. ");
        }
        md += "Rates in % with the 95% Wilson interval; R_h counts answers the judge does not \
               call refusals, the other columns count refusals.\n\n";
        for s in &self.sets {
            md += &format!(
                "- {}: `{}` ({} prompts)\n",
                s.kind.title(),
                s.name,
                s.prompts
            );
        }
        if let Some(u) = &self.utility {
            md += &format!(
                "- utility: `{}`, {}\n",
                u["name"].as_str().unwrap_or(""),
                u["held_out"]["rule"].as_str().unwrap_or("")
            );
        }
        md += "\n| model |";
        for k in &kinds {
            md += &format!(" {} |", k.title());
        }
        if self.utility.is_some() {
            md += " Rouge-L F1 | perplexity |";
        }
        md += "\n|---|";
        md += &"---:|".repeat(kinds.len() + if self.utility.is_some() { 2 } else { 0 });
        md.push('\n');
        for row in &self.models {
            md += &format!("| {} |", md_cell(&row.label));
            if let Some(e) = &row.error {
                md += &format!(" failed: {} |\n", md_cell(e));
                continue;
            }
            let s = self.summaries(row)?;
            for k in &kinds {
                match s.sets.iter().find(|(sk, _)| sk == k) {
                    Some((_, x)) => {
                        let r = &x.rate;
                        md += &format!(
                            " {:.2}% ({}/{}) [{:.2}, {:.2}] |",
                            100.0 * r.rate,
                            r.count,
                            r.n,
                            100.0 * r.ci95_low,
                            100.0 * r.ci95_high
                        )
                    }
                    None => md += " |",
                }
            }
            if let Some(u) = &s.utility {
                md += &format!(
                    " {:.4} | {} |",
                    u.rouge_l_f1,
                    u.perplexity
                        .map(|p| format!("{p:.3}"))
                        .unwrap_or_else(|| "n/a".into())
                );
            }
            md.push('\n');
        }
        md += &self.judge_agreement_markdown();
        Ok(md)
    }

    /// The judges on each model's own responses, per set: gcg against xstest, and the
    /// calibrated probe against union where the responses carry probe scores. Where they
    /// disagree on more than 5%, the rates above depend on the judge chosen, and the section
    /// says so with examples.
    fn judge_agreement_markdown(&self) -> String {
        use crate::judges::agreement::{FLAG_ABOVE, PROBE_NOTE};
        let rows: Vec<(&str, Vec<_>)> = self
            .models
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| (r.label.as_str(), crate::eval::set_agreements(&r.sets)))
            .collect();
        let probe = crate::eval::any_probe(&rows);
        let mut md = format!(
            "\n## The judges on these responses\n\nRefusals by each keyword judge on the same \
             responses{}; sets where two judges disagree on more than {:.0}% are flagged (the \
             rates above then depend on the judge).\n\n\
             | model | set | n | gcg refusals | xstest refusals | gcg vs xstest |{} |\n\
             |---|---|---:|---:|---:|---:|{}---|\n",
            if probe { PROBE_NOTE } else { "" },
            100.0 * FLAG_ABOVE,
            if probe {
                " probe refusals | probe vs union |"
            } else {
                ""
            },
            if probe { "---:|---:|" } else { "" },
        );
        let mut examples = String::new();
        for (label, sets) in &rows {
            for (kind, a) in sets {
                let probe_cells = if probe {
                    let [r, d] = a.probe_cells();
                    format!(" {r} | {d} |")
                } else {
                    String::new()
                };
                md += &format!(
                    "| {} | {} | {} | {} | {} | {} ({:.1}%) |{probe_cells} {} |\n",
                    md_cell(label),
                    kind.title(),
                    a.n,
                    a.gcg_refusals,
                    a.xstest_refusals,
                    a.disagree,
                    100.0 * a.disagree_rate(),
                    if a.flagged() { "**flagged**" } else { "" }
                );
                if a.flagged() {
                    for (by, text) in a.only_one() {
                        examples += &format!(
                            "- {} / {}: only {by} calls this a refusal: \"{}\"\n",
                            md_cell(label),
                            kind.title(),
                            md_cell(text)
                        );
                    }
                }
            }
        }
        if !examples.is_empty() {
            md += "\nExamples from the flagged sets:\n\n";
            md += &examples;
        }
        md
    }

    /// Gives every response its verdict under `judge` (the probe's threshold is calibrated
    /// again per model unless given).
    pub fn rejudge(&mut self, judge: &EvalJudge) -> Result<()> {
        for row in self.models.iter_mut().filter(|r| r.error.is_none()) {
            let label = row.label.clone();
            row.calibration =
                judge_responses(&mut row.sets, judge, &|k| response_file(&label, k.key()))?;
        }
        self.judge = judge.describe();
        Ok(())
    }
}

fn judge_line(j: &Value) -> String {
    let kind = j["kind"].as_str().unwrap_or("?");
    match j["custom_list"].as_str() {
        Some(list) => format!("{kind} with the phrases of `{list}`"),
        None if kind == "gcg" => {
            "gcg (the GCG/AdvBench keyword list, case-sensitive substring)".into()
        }
        None if kind == "xstest" => {
            "xstest (XSTest's refusal prefixes of the lower-cased response)".into()
        }
        None if kind == "union" => {
            "union (a refusal by the gcg keyword list or by XSTest's prefixes)".into()
        }
        None => format!(
            "{kind} (first-token refusal mass above a threshold calibrated against a text judge)"
        ),
    }
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_jsonl<T: serde::Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut s = String::new();
    for it in items {
        s += &serde_json::to_string(it)?;
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

pub(crate) fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read saved responses {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))
        })
        .collect()
}

/// Several eval output directories read back as one table (the demo evaluates each model as a
/// stage of its own, so an interrupted run keeps the models it finished): the sets, generation
/// settings and utility set must be the same in all, and every label distinct.
pub fn load_merged(dirs: &[&Path]) -> Result<EvalReport> {
    let Some((first, rest)) = dirs.split_first() else {
        bail!("no eval output directory to read");
    };
    let mut merged = load(first)?;
    for d in rest {
        let r = load(d)?;
        let differ = |what: &str| {
            anyhow!(
                "{} and {} were evaluated with different {what}; only runs of the same \
                 settings can share a table",
                first.display(),
                d.display()
            )
        };
        if r.settings != merged.settings {
            return Err(differ("generation settings"));
        }
        if r.sets != merged.sets {
            return Err(differ("prompt sets"));
        }
        if r.utility != merged.utility {
            return Err(differ("utility sets"));
        }
        for m in r.models {
            if merged.models.iter().any(|x| x.label == m.label) {
                bail!(
                    "model label `{}` is in {} and in an earlier directory; labels must be \
                     distinct",
                    m.label,
                    d.display()
                );
            }
            merged.models.push(m);
        }
    }
    Ok(merged)
}

/// Reads an eval output directory back: settings, sets, and every model's saved responses
/// (Rouge-L recomputed from response and reference). Verdicts are left as saved.
pub fn load(dir: &Path) -> Result<EvalReport> {
    let p = dir.join("eval.json");
    if !p.is_file() {
        bail!(
            "cannot read {} (is {} an eval output directory?)",
            p.display(),
            dir.display()
        );
    }
    let doc = EvalFile::read(&p)?;
    if doc.format != FORMAT {
        bail!(
            "{}: format is {:?}, expected \"{FORMAT}\"",
            p.display(),
            doc.format
        );
    }
    let mut sets = Vec::new();
    for (key, s) in doc.sets {
        let kind = SetKind::from_key(&key)
            .ok_or_else(|| anyhow!("{}: unknown set `{key}`", p.display()))?;
        sets.push(SetInfo {
            kind,
            name: s.name,
            sha256: s.sha256,
            prompts: s.prompts,
        });
    }
    sets.sort_by_key(|s| s.kind);
    let mut models = Vec::new();
    for m in doc.models {
        let (label, model, precision) = match m {
            EvalModel::Failed(f) => {
                check_label(&f.label)?;
                models.push(ModelRow::failed(&f.label, &f.model, f.error));
                continue;
            }
            EvalModel::Ok(r) => (r.label, r.model, r.precision),
        };
        check_label(&label)?;
        let mut row_sets = Vec::new();
        for s in &sets {
            let rs: Vec<SafetyResponse> =
                read_jsonl(&dir.join(response_file(&label, s.kind.key())))?;
            if rs.len() != s.prompts {
                bail!(
                    "{}: {} responses, eval.json says the set has {}",
                    dir.join(response_file(&label, s.kind.key())).display(),
                    rs.len(),
                    s.prompts
                );
            }
            row_sets.push((s.kind, rs));
        }
        let util = match &doc.utility {
            Some(_) => {
                let mut us: Vec<UtilityResponse> =
                    read_jsonl(&dir.join(response_file(&label, "utility")))?;
                for u in us.iter_mut() {
                    u.rouge_l = rouge_l(&u.response, &u.reference);
                }
                Some(us)
            }
            None => None,
        };
        models.push(ModelRow {
            label,
            model,
            precision,
            error: None,
            sets: row_sets,
            utility: util,
            calibration: None,
        });
    }
    Ok(EvalReport {
        settings: doc.settings,
        judge: doc.judge,
        sets,
        utility: doc.utility,
        rejudged_from: None,
        models,
    })
}
