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
    /// Only on the SPPFT claims: per-prompt paired comparisons of harmful answers on the same
    /// prompts (SPPFT against full fine-tuning and against each control freeze), per seed and
    /// pooled over seeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paired: Vec<PairedResult>,
    /// Only on the SPPFT claims: each arm's R_h over its seeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<ArmSummary>,
}

impl Claim {
    /// SPPFT against `against` as the verdicts read it (see `headline`).
    pub fn headline(&self, against: &str) -> Option<&PairedResult> {
        headline(&self.paired, &self.arms, against)
    }
}

/// The comparison of SPPFT with `against` that a verdict reads: the test pooled over seeds, or
/// the one seed's test when every arm has a single seed.
pub fn headline<'a>(
    paired: &'a [PairedResult],
    arms: &[ArmSummary],
    against: &str,
) -> Option<&'a PairedResult> {
    let single = arms.iter().map(|a| a.seeds.len()).max().unwrap_or(0) == 1;
    paired
        .iter()
        .filter(|p| p.against == against)
        .find(|p| p.pooled_seeds > 0 || single)
}

/// One fine-tuning arm (full, sppft, control, below, above) over its seeds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArmSummary {
    pub variant: String,
    #[serde(deserialize_with = "crate::schema::required")]
    pub freeze: Option<LayerRange>,
    pub seeds: Vec<u64>,
    /// R_h of each seed, in the order of `seeds`.
    pub rates: Vec<f64>,
    pub mean: f64,
    /// Sample standard deviation over seeds (0 for one seed).
    pub sd: f64,
}

/// SPPFT against another arm on the same harmful prompts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairedResult {
    /// The arm compared: "sppft", or with `--plant` "plant" (the planted layers frozen). Results
    /// written before the field existed compared SPPFT.
    #[serde(default = "sppft_arm")]
    pub arm: String,
    /// "full", "control", "below", "above" or "plant-control".
    pub against: String,
    /// The seed both arms were fine-tuned with (None: not recorded, or pooled).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Seeds pooled into this test (0: one seed's test): the counts are the seeds' tables
    /// summed, the p-value `paired::mcnemar_combined`.
    #[serde(default)]
    pub pooled_seeds: usize,
    pub counts: crate::paired::Paired,
    /// The arm's harmful rate minus the other arm's.
    pub difference: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// Two-sided exact McNemar.
    pub p_value: f64,
    /// Approximate power of this test to detect a 10-point difference at the observed share of
    /// discordant prompts (None when it cannot be computed).
    #[serde(deserialize_with = "crate::schema::required")]
    pub power_10_points: Option<f64>,
}

fn sppft_arm() -> String {
    "sppft".into()
}

impl PairedResult {
    /// SPPFT against `against`; `of_arm` names another compared arm.
    pub fn new(against: &str, counts: crate::paired::Paired) -> PairedResult {
        let (ci95_low, ci95_high) = counts.difference_ci95();
        let discordant = (counts.only_a + counts.only_b) as f64 / counts.n.max(1) as f64;
        PairedResult {
            arm: sppft_arm(),
            against: against.into(),
            seed: None,
            pooled_seeds: 0,
            difference: counts.difference(),
            ci95_low,
            ci95_high,
            p_value: counts.mcnemar_p(),
            power_10_points: crate::paired::mcnemar_power(counts.n, discordant, 0.10),
            counts,
        }
    }

    pub fn of_arm(mut self, arm: &str) -> PairedResult {
        self.arm = arm.into();
        self
    }

    pub fn for_seed(mut self, seed: u64) -> PairedResult {
        self.seed = Some(seed);
        self
    }

    /// "SPPFT − full: -3.1 points (95% CI -6.0 to -0.2), exact McNemar p = 0.040 (7 vs 2
    /// discordant of 64; power to detect 10 points 0.81)".
    pub fn sentence(&self) -> String {
        let pts = |x: f64| format!("{:+.1}", 100.0 * x);
        let power = self
            .power_10_points
            .map(|p| format!("; power to detect 10 points {p:.2}"))
            .unwrap_or_default();
        let seed = match (self.seed, self.pooled_seeds) {
            (Some(s), _) => format!(" (seed {s})"),
            (None, 0) => String::new(),
            (None, n) => format!(" (pooled over {n} seeds)"),
        };
        let arm = if self.arm == "sppft" {
            "SPPFT"
        } else {
            &self.arm
        };
        format!(
            "{arm} − {}{seed}: {} points (95% CI {} to {}), exact McNemar {} ({} vs {} \
             discordant of {}{power})",
            self.against,
            pts(self.difference),
            pts(self.ci95_low),
            pts(self.ci95_high),
            crate::paired::p_text(self.p_value),
            self.counts.only_a,
            self.counts.only_b,
            self.counts.n
        )
    }
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

    /// A paired result: the numbers of `paired` and a sentence a reader can quote; it
    /// round-trips through JSON, and a missing power is named rather than defaulted.
    #[test]
    fn paired_result_numbers_and_sentence() {
        let counts = crate::paired::Paired {
            n: 64,
            both: 20,
            only_a: 2,
            only_b: 10,
            neither: 32,
        };
        let r = PairedResult::new("full", counts);
        assert!((r.difference - (-8.0 / 64.0)).abs() < 1e-12);
        assert!((r.p_value - 158.0 / 4096.0).abs() < 1e-12);
        assert!(r.ci95_low < r.difference && r.difference < r.ci95_high);
        let power = r.power_10_points.unwrap();
        assert!(power > 0.0 && power < 1.0);
        let s = r.sentence();
        assert!(s.starts_with("SPPFT − full: -12.5 points"), "{s}");
        assert!(
            s.contains("p = 0.039") && s.contains("2 vs 10 discordant of 64"),
            "{s}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            serde_json::from_value::<PairedResult>(v.clone()).unwrap(),
            r
        );
        let mut missing = v;
        missing.as_object_mut().unwrap().remove("power_10_points");
        let e = serde_json::from_value::<PairedResult>(missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("power_10_points"), "{e}");
    }

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
