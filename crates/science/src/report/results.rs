//! results.json: every number the demo's report shows, with provenance.

use crate::cosine::file::LargestGap;
use crate::cosine::range_rule::InitialRange;
use crate::demo::Provenance;
use crate::eval::file::EvalFile;
use crate::locate::Sweep;
use crate::schema::{self, required};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sl_engine::io::atomic::write_atomic;
use sl_engine::LayerRange;
use std::collections::BTreeMap;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultsFile {
    pub schema_version: u32,
    /// The verdict on each of the paper's findings.
    pub claims: Vec<Claim>,
    /// eval/eval.json.
    pub eval: EvalFile,
    pub cosine: CosineResults,
    pub locate: LocateResults,
    /// From aligned/align.json: `data`, `final_loss` (its `training.final_loss`), `seconds`.
    pub align: Value,
    /// From each run's finetune.json, by run name.
    pub finetune: BTreeMap<String, FinetuneBrief>,
    pub provenance: Provenance,
}

/// What the report shows of one fine-tuning run (from its finetune.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneBrief {
    pub steps: usize,
    pub tokens: usize,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    #[serde(deserialize_with = "crate::schema::required")]
    pub final_loss: Option<f64>,
    pub frozen_parameters: usize,
    pub frozen_tensors_identical: bool,
    #[serde(deserialize_with = "crate::schema::required")]
    pub peak_rss_mb: Option<f64>,
}

impl From<&crate::finetune::summary::FinetuneSummary> for FinetuneBrief {
    fn from(s: &crate::finetune::summary::FinetuneSummary) -> Self {
        FinetuneBrief {
            steps: s.steps,
            tokens: s.tokens,
            train_seconds: s.train_seconds,
            tokens_per_second: s.tokens_per_second,
            final_loss: s.final_loss,
            frozen_parameters: s.frozen_parameters,
            frozen_tensors_identical: s.frozen_tensors_identical,
            peak_rss_mb: s.peak_rss_mb,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claim {
    pub claim: String,
    /// Starts with "reproduced", "not", or another word for a partial result.
    pub verdict: String,
    pub evidence: String,
    /// Only on the SPPFT claims: whether the control freeze's R_h is above SPPFT's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_protects_less: Option<bool>,
}

/// From cosine/cosine.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CosineResults {
    #[serde(deserialize_with = "required")]
    pub largest_gap: Option<LargestGap>,
    #[serde(deserialize_with = "required")]
    pub initial_range: Option<InitialRange>,
    /// The compared (base) model's.
    #[serde(deserialize_with = "required")]
    pub base_largest_gap: Option<LargestGap>,
}

/// From locate/locate.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocateResults {
    pub alpha: f64,
    pub baseline: usize,
    pub queries: usize,
    pub range: LayerRange,
    pub upper_sweep: Sweep,
    pub lower_sweep: Sweep,
}

impl ResultsFile {
    pub fn read(path: &Path) -> Result<ResultsFile> {
        schema::read(path, SCHEMA_VERSION)
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, schema::to_pretty(self)?.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn results_file_round_trips_and_names_missing_fields() {
        let cos = crate::cosine::file::tests::sample();
        let loc = crate::locate::file::tests::sample();
        let v = json!({
            "schema_version": SCHEMA_VERSION,
            "claims": [{"claim": "1.", "verdict": "reproduced", "evidence": "gap"},
                       {"claim": "3.", "verdict": "not reproduced", "evidence": "R_h",
                        "control_protects_less": true}],
            "eval": crate::eval::file::tests::sample(),
            "cosine": {"largest_gap": cos["largest_gap"], "initial_range": cos["initial_range"],
                       "base_largest_gap": cos["compare"]["largest_gap"]},
            "locate": {"alpha": loc["alpha"], "baseline": loc["baseline"],
                       "queries": loc["queries"], "range": loc["range"],
                       "upper_sweep": loc["upper_sweep"], "lower_sweep": loc["lower_sweep"]},
            "align": {"data": {"harmful": {"chosen": 16}}, "final_loss": 1.25, "seconds": 3.5},
            "finetune": {"ft-di-full": {"steps": 3, "tokens": 120, "train_seconds": 1.5,
                                        "tokens_per_second": 80.0, "final_loss": 2.25,
                                        "frozen_parameters": 0, "frozen_tensors_identical": true,
                                        "peak_rss_mb": null}},
            "provenance": crate::demo::tests::provenance_sample(),
        });
        crate::schema::tests::check_file::<ResultsFile>(v.clone(), SCHEMA_VERSION, "provenance");
        crate::schema::tests::check_file::<ResultsFile>(v, SCHEMA_VERSION, "cosine");
    }
}
