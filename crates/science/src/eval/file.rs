//! eval.json: what `eval` writes, and what `eval --responses` and the demo's report read back.

use crate::eval::utility::UtilitySummary;
use crate::eval::{SetKind, SetSummary};
use crate::judges::probe::Calibration;
use crate::schema::{self, required, Precision};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalFile {
    pub schema_version: u32,
    /// `report::FORMAT`.
    pub format: String,
    /// Generation settings (template, token limits, batch size, limits), as given.
    pub settings: Value,
    /// `EvalJudge::describe()`.
    pub judge: Value,
    /// By `SetKind::key()`.
    pub sets: BTreeMap<String, SetFileInfo>,
    /// `UtilitySet::describe()`, when utility was evaluated.
    #[serde(deserialize_with = "required")]
    pub utility: Option<Value>,
    /// The directory whose saved responses were re-judged.
    #[serde(deserialize_with = "required")]
    pub rejudged_from: Option<String>,
    pub models: Vec<EvalModel>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetFileInfo {
    pub name: String,
    pub sha256: String,
    pub prompts: usize,
    pub metric: String,
}

/// A model's row, by its `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status")]
pub enum EvalModel {
    #[serde(rename = "ok")]
    Ok(Box<EvalRow>),
    #[serde(rename = "failed")]
    Failed(FailedRow),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedRow {
    pub label: String,
    pub model: String,
    pub error: String,
}

/// The summaries of an evaluated model. A set that was not evaluated has no key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRow {
    pub label: String,
    pub model: String,
    /// How the model computed (absent in files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Always null here (every row has an `error` key).
    pub error: (),
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmful: Option<SetSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_rejection: Option<SetSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xstest_safe: Option<SetSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xstest_unsafe: Option<SetSummary>,
    #[serde(deserialize_with = "required")]
    pub utility: Option<UtilitySummary>,
    #[serde(deserialize_with = "required")]
    pub probe_calibration: Option<Calibration>,
    /// Response files relative to the eval directory, by set key (and "utility").
    pub responses: BTreeMap<String, String>,
}

impl EvalRow {
    pub fn set(&self, kind: SetKind) -> Option<&SetSummary> {
        match kind {
            SetKind::Harmful => self.harmful.as_ref(),
            SetKind::OverRejection => self.over_rejection.as_ref(),
            SetKind::XstestSafe => self.xstest_safe.as_ref(),
            SetKind::XstestUnsafe => self.xstest_unsafe.as_ref(),
        }
    }

    pub fn set_mut(&mut self, kind: SetKind) -> &mut Option<SetSummary> {
        match kind {
            SetKind::Harmful => &mut self.harmful,
            SetKind::OverRejection => &mut self.over_rejection,
            SetKind::XstestSafe => &mut self.xstest_safe,
            SetKind::XstestUnsafe => &mut self.xstest_unsafe,
        }
    }
}

impl EvalFile {
    pub fn read(path: &Path) -> Result<EvalFile> {
        schema::read(path, SCHEMA_VERSION)
    }

    /// The pretty JSON, newline-terminated.
    pub fn to_pretty(&self) -> Result<String> {
        Ok(schema::to_pretty(self)? + "\n")
    }

    /// The evaluated row of `label`, if any.
    pub fn row(&self, label: &str) -> Option<&EvalRow> {
        self.models.iter().find_map(|m| match m {
            EvalModel::Ok(r) if r.label == label => Some(r.as_ref()),
            _ => None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn sample() -> Value {
        let set = |name: &str, metric: &str| {
            json!({"set": name, "refusals": 2, "empty": 0, "metric": metric,
                   "count": 6, "n": 8, "rate": 0.75, "ci95_low": 0.4, "ci95_high": 0.9})
        };
        json!({
            "schema_version": SCHEMA_VERSION,
            "format": "safety-layers eval 1",
            "settings": {"template": "alpaca", "max_new_tokens": 12},
            "judge": {"kind": "gcg", "phrases": ["Sorry"], "custom_list": null},
            "sets": {"harmful": {"name": "advbench", "sha256": "ab", "prompts": 8,
                                 "metric": "harmful_rate"},
                     "over_rejection": {"name": "do", "sha256": "cd", "prompts": 8,
                                        "metric": "refusal_rate"}},
            "utility": {"name": "alpaca", "held_out": {"rule": "the last 4 records", "n": 4}},
            "rejudged_from": null,
            "models": [
                {"status": "ok", "label": "aligned", "model": "dir", "error": null,
                 "harmful": set("advbench", "harmful_rate"),
                 "over_rejection": set("do", "refusal_rate"),
                 "utility": {"records": 4, "rouge_l_f1": 0.25, "rouge_l_precision": 0.5,
                             "rouge_l_recall": 0.125, "perplexity": null, "mean_nll": null,
                             "reference_tokens": 0, "truncated_references": 0},
                 "probe_calibration": null,
                 "responses": {"harmful": "responses/aligned/harmful.jsonl"}},
                {"status": "failed", "label": "broken", "model": "nowhere",
                 "error": "cannot read nowhere"},
            ],
        })
    }

    #[test]
    fn eval_file_round_trips_and_names_missing_fields() {
        crate::schema::tests::check_file::<EvalFile>(sample(), SCHEMA_VERSION, "rejudged_from");
        let f: EvalFile = schema::from_str(&sample().to_string(), SCHEMA_VERSION).unwrap();
        assert_eq!(
            f.row("aligned")
                .unwrap()
                .set(SetKind::Harmful)
                .unwrap()
                .rate
                .count,
            6
        );
        assert!(f.row("broken").is_none() && f.row("aligned").unwrap().xstest_safe.is_none());
    }

    #[test]
    fn a_row_without_a_field_names_it() {
        for (field, status) in [("utility", "ok"), ("error", "failed"), ("status", "")] {
            let mut v = sample();
            let i = if status == "failed" { 1 } else { 0 };
            v["models"][i].as_object_mut().unwrap().remove(field);
            let e = schema::from_str::<EvalFile>(&v.to_string(), SCHEMA_VERSION)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
    }
}
