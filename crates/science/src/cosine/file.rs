//! cosine.json: what `cosine` writes, and what `locate --cosine` and the demo's report read back.

use crate::cosine::range_rule::InitialRange;
use crate::cosine::report::{CosineConfig, ModelCurves, PromptSet};
use crate::cosine::{EntryStats, PairCounts, Pairs};
use crate::schema::{self, required, Precision};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sl_engine::io::atomic::write_atomic;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CosineFile {
    pub schema_version: u32,
    /// The analysed model (its fields sit at the top level of the file).
    #[serde(flatten)]
    pub main: CosineRun,
    /// The `--compare` model on the same prompts, if any.
    #[serde(deserialize_with = "required")]
    pub compare: Option<CosineRun>,
    pub template: String,
    pub pairs: PairsInfo,
    pub seed: u64,
    pub prompt_sets: PromptSets,
    /// How the std columns are computed.
    pub std: String,
    pub gap_definitions: GapDefinitions,
    pub entry_convention: String,
    /// The initial-range rule, in words.
    pub rule: String,
}

/// One model's curves and timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CosineRun {
    pub model: String,
    /// How the model computed (absent in files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    #[serde(deserialize_with = "required")]
    pub initial_range: Option<InitialRange>,
    /// None only when there are no entries.
    #[serde(deserialize_with = "required")]
    pub largest_gap: Option<LargestGap>,
    pub pair_counts: PairCounts,
    pub entries: Vec<EntryStats>,
    pub timing: Timing,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LargestGap {
    pub entry: usize,
    /// The layer whose output the entry is (`entry - 1`; -1 = the embeddings).
    pub layer: i64,
    pub gap_code_deg: f64,
    pub gap_paper_deg: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    pub prompts: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairsInfo {
    /// "all" or "sampled".
    pub mode: String,
    /// Pairs per type when sampled.
    #[serde(deserialize_with = "required")]
    pub per_type: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptSets {
    pub normal: PromptSetInfo,
    pub malicious: PromptSetInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptSetInfo {
    pub name: String,
    pub sha256: String,
    pub n: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GapDefinitions {
    pub gap_code_deg: String,
    pub gap_paper_deg: String,
}

impl CosineRun {
    pub fn new(r: &ModelCurves) -> CosineRun {
        CosineRun {
            model: r.model.clone(),
            precision: Some(r.precision.clone()),
            initial_range: r.curves.initial_range,
            largest_gap: r.curves.largest_gap().map(|e| LargestGap {
                entry: e.entry,
                layer: e.entry as i64 - 1,
                gap_code_deg: e.gap_code_deg,
                gap_paper_deg: e.gap_paper_deg,
            }),
            pair_counts: r.curves.pair_counts.clone(),
            entries: r.curves.entries.clone(),
            timing: Timing {
                prompts: r.prompts,
                tokens: r.tokens,
                seconds: r.seconds,
                tokens_per_second: r.tokens_per_second(),
            },
        }
    }
}

fn set_info(s: &PromptSet) -> PromptSetInfo {
    PromptSetInfo {
        name: s.name.clone(),
        sha256: s.sha256.clone(),
        n: s.records.len(),
    }
}

impl CosineFile {
    pub fn new(
        main: &ModelCurves,
        compare: Option<&ModelCurves>,
        normal: &PromptSet,
        malicious: &PromptSet,
        cfg: &CosineConfig,
    ) -> CosineFile {
        let (mode, per_type) = match cfg.pairs {
            Pairs::All => ("all", None),
            Pairs::Sampled(r) => ("sampled", Some(r)),
        };
        CosineFile {
            schema_version: SCHEMA_VERSION,
            main: CosineRun::new(main),
            compare: compare.map(CosineRun::new),
            template: cfg.template.name().to_string(),
            pairs: PairsInfo {
                mode: mode.into(),
                per_type,
            },
            seed: cfg.seed,
            prompt_sets: PromptSets {
                normal: set_info(normal),
                malicious: set_info(malicious),
            },
            std: "population (ddof=0)".into(),
            gap_definitions: GapDefinitions {
                gap_code_deg: "deg(acos(mean cos N-M)) - deg(acos(mean cos N-N)), as the official \
                               code plots it"
                    .into(),
                gap_paper_deg: "mean over N-M pairs of angle(n,m) - mean over N-N pairs of \
                                angle(n,n'), as the paper writes it"
                    .into(),
            },
            entry_convention: "entry 0 = embedding output; entry e = output of layer e-1 \
                               (0-indexed); the last entry is after the final norm"
                .into(),
            rule: main.curves.rule.to_string(),
        }
    }

    /// The initial range a cosine.json found, checked against the model's layer count.
    pub fn initial_range(path: &Path, num_layers: usize) -> Result<sl_engine::LayerRange> {
        let Some(r) = CosineFile::read(path)?.main.initial_range else {
            anyhow::bail!(
                "{}: the cosine analysis found no initial range (no gap opens); give --initial I-J",
                path.display()
            );
        };
        sl_engine::LayerRange::new(r.first, r.last, num_layers)
    }

    pub fn read(path: &Path) -> Result<CosineFile> {
        schema::read(path, SCHEMA_VERSION)
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, schema::to_pretty(self)?.as_bytes())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn run(model: &str) -> Value {
        json!({
            "model": model,
            "initial_range": {"first": 1, "last": 2, "steepest": 1},
            "largest_gap": {"entry": 2, "layer": 1, "gap_code_deg": 3.5, "gap_paper_deg": 3.25},
            "pair_counts": {"nn": 3, "mm": 3, "nm": 9},
            "entries": [{"entry": 0, "nn_mean": 0.9, "nn_std": 0.01, "mm_mean": 0.8, "mm_std": 0.02,
                         "nm_mean": 0.7, "nm_std": 0.03, "gap_code_deg": 3.5,
                         "gap_paper_deg": 3.25}],
            "timing": {"prompts": 6, "tokens": 60, "seconds": 0.5, "tokens_per_second": 120.0},
        })
    }

    pub fn sample() -> Value {
        let mut v = run("aligned");
        let extra = json!({
            "schema_version": SCHEMA_VERSION,
            "compare": run("base"),
            "template": "alpaca",
            "pairs": {"mode": "all", "per_type": null},
            "seed": 0,
            "prompt_sets": {"normal": {"name": "n", "sha256": "ab", "n": 3},
                            "malicious": {"name": "m", "sha256": "cd", "n": 3}},
            "std": "population (ddof=0)",
            "gap_definitions": {"gap_code_deg": "code", "gap_paper_deg": "paper"},
            "entry_convention": "entry 0 = embedding output",
            "rule": "the rule",
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn cosine_file_round_trips_and_names_missing_fields() {
        crate::schema::tests::check_file::<CosineFile>(sample(), SCHEMA_VERSION, "initial_range");
        crate::schema::tests::check_file::<CosineFile>(sample(), SCHEMA_VERSION, "compare");
    }
}
