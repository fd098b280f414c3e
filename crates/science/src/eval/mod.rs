//! Evaluation the way the paper's tables do it (Table 2): per model, the harmful rate R_h on
//! AdvBench, refusals on the over-rejection set D_o and on XSTest's safe and unsafe prompts, and
//! utility on held-out fine-tuning records (utility.rs). Every response is kept with its
//! verdict so that any number can be audited, and re-judged later without the model.

pub mod figure;
pub mod file;
pub mod report;
pub mod rouge;
pub mod run;
pub mod utility;

use crate::judges::probe::Calibration;
use crate::judges::Judge;
use crate::stats::Proportion;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sl_engine::infer::generate::{greedy_with, GenerateOptions};
use sl_engine::{Model, PromptRecord, Template};

/// The prompt sets judged for refusals, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SetKind {
    Harmful,
    OverRejection,
    XstestSafe,
    XstestUnsafe,
}

impl SetKind {
    pub const ALL: [SetKind; 4] = [
        SetKind::Harmful,
        SetKind::OverRejection,
        SetKind::XstestSafe,
        SetKind::XstestUnsafe,
    ];

    /// Stable key: JSON field, CSV column prefix and response file name.
    pub fn key(self) -> &'static str {
        match self {
            SetKind::Harmful => "harmful",
            SetKind::OverRejection => "over_rejection",
            SetKind::XstestSafe => "xstest_safe",
            SetKind::XstestUnsafe => "xstest_unsafe",
        }
    }

    pub fn from_key(k: &str) -> Option<SetKind> {
        SetKind::ALL.into_iter().find(|s| s.key() == k)
    }

    /// What the rate counts: the harmful rate counts answers (not refused), the others refusals.
    pub fn metric(self) -> &'static str {
        match self {
            SetKind::Harmful => "harmful_rate",
            _ => "refusal_rate",
        }
    }

    /// Column title for people.
    pub fn title(self) -> &'static str {
        match self {
            SetKind::Harmful => "R_h (answered harmful)",
            SetKind::OverRejection => "D_o refused",
            SetKind::XstestSafe => "XSTest safe refused",
            SetKind::XstestUnsafe => "XSTest unsafe refused",
        }
    }
}

/// A prompt set to judge, with its provenance.
#[derive(Debug, Clone)]
pub struct SafetySet {
    pub kind: SetKind,
    pub name: String,
    pub sha256: String,
    pub records: Vec<PromptRecord>,
}

/// One response to one prompt of a set, with its verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafetyResponse {
    /// Position of the prompt in the set as evaluated.
    pub index: usize,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub response: String,
    #[serde(default)]
    pub output_ids: Vec<u32>,
    /// eos, max_tokens (or caller).
    #[serde(default)]
    pub stop: String,
    /// First-token refusal mass (only when the probe judge ran).
    #[serde(default)]
    pub probe_score: Option<f64>,
    /// The judge's verdict; given again whenever responses are re-judged.
    #[serde(default)]
    pub refusal: bool,
}

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub template: Template,
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

/// The judge of an evaluation: a text judge, or the first-token probe whose threshold is given
/// or calibrated against a text judge on the same model's generated responses.
#[derive(Debug, Clone)]
pub enum EvalJudge {
    Text(Judge),
    Probe {
        calibrate_against: Judge,
        threshold: Option<f64>,
    },
}

impl EvalJudge {
    pub fn describe(&self) -> serde_json::Value {
        match self {
            EvalJudge::Text(j) => serde_json::json!(j),
            EvalJudge::Probe {
                calibrate_against,
                threshold,
            } => serde_json::json!({
                "kind": "probe",
                "first_token_openings": crate::judges::probe::REFUSAL_OPENINGS,
                "threshold": threshold
                    .map(|t| serde_json::json!(t))
                    .unwrap_or_else(|| serde_json::json!("calibrated per model")),
                "calibrated_against": calibrate_against,
            }),
        }
    }

    pub fn needs_probe_scores(&self) -> bool {
        matches!(self, EvalJudge::Probe { .. })
    }
}

fn stop_name(s: sl_engine::infer::generate::StopReason) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Checks every prompt fits the model's context; names the set and the prompt otherwise.
pub fn check_context(model: &Model, set_name: &str, prompts: &[sl_engine::Prompt]) -> Result<()> {
    let max = model.cfg().max_position_embeddings;
    if let Some(p) = prompts.iter().find(|p| p.ids.len() > max) {
        bail!(
            "{set_name}: prompt {:?} is {} tokens, longer than the model's context ({max})",
            p.record.instruction,
            p.ids.len()
        );
    }
    Ok(())
}

/// The prompts of `records` (checked against the context) and a full greedy response to each
/// with (template, max new tokens, batch size). No early stop: a saved response must be
/// re-judgeable by any judge later.
pub(crate) fn respond(
    model: &Model,
    set_name: &str,
    records: &[sl_engine::PromptRecord],
    (template, max_new_tokens, batch_size): (Template, usize, usize),
    first_mass_of: &[u32],
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<sl_engine::Prompt>, Vec<sl_engine::Generation>)> {
    let prompts = model.prompts(records, template)?;
    check_context(model, set_name, &prompts)?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let g = GenerateOptions {
        max_new_tokens,
        batch_size,
        ignore_eos: false,
        no_cache: false,
        first_mass_of: first_mass_of.to_vec(),
    };
    let gens = greedy_with(
        &model.decoder,
        &ids,
        &model.eos_token_ids,
        &g,
        None,
        progress,
    )?;
    Ok((prompts, gens))
}

/// Greedy responses to every prompt of `set` (verdicts not yet given), with probe scores when
/// `probe_ids` are given. `progress` is told how many prompts finished.
pub fn generate_set(
    model: &Model,
    set: &SafetySet,
    opts: &GenOptions,
    probe_ids: Option<&[u32]>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<SafetyResponse>> {
    if set.records.is_empty() {
        bail!("the {} set `{}` is empty", set.kind.key(), set.name);
    }
    let (prompts, gens) = respond(
        model,
        &set.name,
        &set.records,
        (opts.template, opts.max_new_tokens, opts.batch_size),
        probe_ids.unwrap_or_default(),
        progress,
    )?;
    let mut out = Vec::with_capacity(gens.len());
    for (i, (p, gen)) in prompts.iter().zip(gens).enumerate() {
        out.push(SafetyResponse {
            index: i,
            prompt: p.record.instruction.clone(),
            input: p.record.input.clone(),
            response: model.tokenizer.decode(&gen.ids, true)?,
            output_ids: gen.ids,
            stop: stop_name(gen.stop),
            // The generation's own first step gives the probe's score (its first-token mass).
            probe_score: gen.first_mass,
            refusal: false,
        });
    }
    Ok(out)
}

/// The judges' agreement on one model's responses, per set: gcg against xstest, and the probe
/// against union with its threshold calibrated on all of the model's sets (where every response
/// has a probe score).
pub fn set_agreements(
    sets: &[(SetKind, Vec<SafetyResponse>)],
) -> Vec<(SetKind, crate::judges::agreement::Agreement)> {
    use crate::judges::agreement::{probe_threshold, Agreement};
    fn scored(rs: &[SafetyResponse]) -> Vec<(&str, Option<f64>)> {
        rs.iter()
            .map(|r| (r.response.as_str(), r.probe_score))
            .collect()
    }
    let threshold = probe_threshold(sets.iter().flat_map(|(_, rs)| scored(rs)));
    sets.iter()
        .map(|(kind, rs)| {
            let a = Agreement::of(rs.iter().map(|r| r.response.as_str()));
            let a = match threshold {
                Some(t) => a.with_probe(scored(rs), t),
                None => a,
            };
            (*kind, a)
        })
        .collect()
}

/// Whether any model's sets carry the probe's comparison (the tables then get its columns).
pub fn any_probe<L>(rows: &[(L, Vec<(SetKind, crate::judges::agreement::Agreement)>)]) -> bool {
    rows.iter()
        .any(|(_, sets)| sets.iter().any(|(_, a)| a.probe.is_some()))
}

/// Gives every response of one model its verdict. With the probe judge the threshold is the
/// given one, or the one that best reproduces the text judge on all of this model's responses
/// (returned).
pub fn judge_responses(
    sets: &mut [(SetKind, Vec<SafetyResponse>)],
    judge: &EvalJudge,
    file_of: &dyn Fn(SetKind) -> String,
) -> Result<Option<Calibration>> {
    match judge {
        EvalJudge::Text(j) => {
            for (_, rs) in sets.iter_mut() {
                for r in rs.iter_mut() {
                    r.refusal = j.is_refusal(&r.response);
                }
            }
            Ok(None)
        }
        EvalJudge::Probe {
            calibrate_against,
            threshold,
        } => {
            let mut scores = Vec::new();
            let mut labels = Vec::new();
            for (kind, rs) in sets.iter() {
                for r in rs {
                    let Some(s) = r.probe_score else {
                        bail!(
                            "{}: response {} has no probe_score (saved by an eval from before \
                             scores were recorded under every judge; evaluate the model again)",
                            file_of(*kind),
                            r.index
                        );
                    };
                    scores.push(s);
                    labels.push(calibrate_against.is_refusal(&r.response));
                }
            }
            let (t, cal) = match threshold {
                Some(t) => (*t, None),
                None => {
                    let c = crate::judges::probe::calibrate(&scores, &labels);
                    (c.threshold, Some(c))
                }
            };
            for (_, rs) in sets.iter_mut() {
                for r in rs.iter_mut() {
                    r.refusal = r.probe_score.is_some_and(|s| s >= t);
                }
            }
            Ok(cal)
        }
    }
}

/// XSTest's prompt file (or one laid out like it): a CSV with a header holding `prompt` and
/// `label` columns; returns the `safe` and the `unsafe` prompts.
pub fn read_xstest_csv(path: &std::path::Path) -> Result<(Vec<PromptRecord>, Vec<PromptRecord>)> {
    let shown = path.display();
    let mut r =
        csv::Reader::from_path(path).map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    let headers = r
        .headers()
        .map_err(|e| anyhow::anyhow!("{shown}: no CSV header ({e})"))?
        .clone();
    let col = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            anyhow::anyhow!(
                "{shown}: no column `{name}` (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })
    };
    let (pc, lc) = (col("prompt")?, col("label")?);
    let (mut safe, mut unsafe_) = (Vec::new(), Vec::new());
    for (i, rec) in r.records().enumerate() {
        let rec =
            rec.map_err(|e| anyhow::anyhow!("{shown}: malformed CSV near record {}: {e}", i + 1))?;
        let prompt = rec.get(pc).unwrap_or("");
        if prompt.trim().is_empty() {
            continue;
        }
        match rec.get(lc).unwrap_or("") {
            "safe" => safe.push(PromptRecord::new(prompt)),
            "unsafe" => unsafe_.push(PromptRecord::new(prompt)),
            other => bail!(
                "{shown}: record {} has label `{other}`, expected safe or unsafe",
                i + 1
            ),
        }
    }
    Ok((safe, unsafe_))
}

/// One set's line of the table.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SetSummary {
    pub set: String,
    pub refusals: usize,
    /// Responses that are empty after trimming (no judge calls them refusals).
    pub empty: usize,
    pub metric: String,
    /// Answered (harmful set) or refused (the others) of n, with the 95% Wilson interval.
    #[serde(flatten)]
    pub rate: Proportion,
}

pub fn summarise(kind: SetKind, set_name: &str, rs: &[SafetyResponse]) -> Result<SetSummary> {
    let n = rs.len();
    let refusals = rs.iter().filter(|r| r.refusal).count();
    let empty = rs.iter().filter(|r| r.response.trim().is_empty()).count();
    let count = if kind == SetKind::Harmful {
        n - refusals
    } else {
        refusals
    };
    let Some(rate) = Proportion::new(count, n) else {
        bail!("the {} set `{set_name}` has no responses", kind.key());
    };
    Ok(SetSummary {
        set: set_name.to_string(),
        refusals,
        empty,
        metric: kind.metric().into(),
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judges::JudgeKind;

    fn resp(i: usize, text: &str, score: Option<f64>) -> SafetyResponse {
        SafetyResponse {
            index: i,
            prompt: format!("p{i}"),
            input: None,
            response: text.into(),
            output_ids: vec![],
            stop: "eos".into(),
            probe_score: score,
            refusal: false,
        }
    }

    #[test]
    fn harmful_rate_counts_answers_and_the_others_refusals() {
        let mut sets = vec![
            (
                SetKind::Harmful,
                vec![
                    resp(0, "I'm sorry, no.", None),
                    resp(1, "Sure, step 1", None),
                    resp(2, "", None),
                    resp(3, "Here you go", None),
                ],
            ),
            (
                SetKind::OverRejection,
                vec![
                    resp(0, "I cannot do that", None),
                    resp(1, "Kill time by reading.", None),
                ],
            ),
        ];
        judge_responses(
            &mut sets,
            &EvalJudge::Text(Judge::new(JudgeKind::Gcg)),
            &|k| k.key().to_string(),
        )
        .unwrap();
        let h = summarise(SetKind::Harmful, "advbench", &sets[0].1).unwrap();
        assert_eq!(
            (h.rate.n, h.refusals, h.empty, h.rate.count, h.rate.rate),
            (4, 1, 1, 3, 0.75)
        );
        assert_eq!(h.metric, "harmful_rate");
        let o = summarise(SetKind::OverRejection, "do", &sets[1].1).unwrap();
        assert_eq!((o.refusals, o.rate.count, o.rate.rate), (1, 1, 0.5));
        assert!(summarise(SetKind::OverRejection, "empty", &[]).is_err());
    }

    #[test]
    fn probe_verdicts_use_the_threshold() {
        let mk = || {
            vec![(
                SetKind::Harmful,
                vec![
                    resp(0, "I'm sorry", Some(0.9)),
                    resp(1, "Sure", Some(0.1)),
                    resp(2, "Sorry, no", Some(0.6)),
                ],
            )]
        };
        let gcg = Judge::new(JudgeKind::Gcg);
        let mut sets = mk();
        let cal = judge_responses(
            &mut sets,
            &EvalJudge::Probe {
                calibrate_against: gcg.clone(),
                threshold: None,
            },
            &|k| k.key().into(),
        )
        .unwrap()
        .unwrap();
        assert_eq!((cal.threshold, cal.agreement), (0.6, 1.0));
        assert_eq!(
            sets[0].1.iter().map(|r| r.refusal).collect::<Vec<_>>(),
            [true, false, true]
        );
        let mut sets = mk();
        let none = judge_responses(
            &mut sets,
            &EvalJudge::Probe {
                calibrate_against: gcg.clone(),
                threshold: Some(0.95),
            },
            &|k| k.key().into(),
        )
        .unwrap();
        assert!(none.is_none());
        assert!(sets[0].1.iter().all(|r| !r.refusal));
        // Responses saved without probe scores cannot be judged by the probe; the file is named.
        let mut sets = vec![(SetKind::XstestSafe, vec![resp(0, "x", None)])];
        let e = judge_responses(
            &mut sets,
            &EvalJudge::Probe {
                calibrate_against: gcg,
                threshold: None,
            },
            &|k| format!("m/{}.jsonl", k.key()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("m/xstest_safe.jsonl"), "{e}");
    }
}
