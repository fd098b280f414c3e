//! locate.json: what `locate` writes, and what `finetune`/`export --freeze-from`, the demo and
//! its report read back.

use crate::judges::probe::Calibration;
use crate::judges::Judge;
use crate::locate::{AlphaStep, Sweep};
use crate::schema::{self, required, Precision};
use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use sl_engine::io::atomic::write_atomic;
use sl_engine::LayerRange;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocateFile {
    pub schema_version: u32,
    pub meta: LocateMeta,
    pub judge: LocateJudge,
    /// Over-rejection queries judged per run.
    pub queries: usize,
    pub initial_range: LayerRange,
    pub alpha: f64,
    /// With `--alpha auto`: every alpha tried (paper A.3.4); empty with a fixed alpha.
    pub alpha_steps: Vec<AlphaStep>,
    pub objective: String,
    /// Refusals of the unscaled model.
    pub baseline: usize,
    pub upper_sweep: Sweep,
    pub lower_sweep: Sweep,
    /// The chosen safety layers.
    pub range: LayerRange,
    pub runs: Vec<RunInfo>,
    pub seconds: f64,
}

/// The command's settings and inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocateMeta {
    pub model: String,
    /// How the model computed (absent in files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    pub over_rejection: String,
    pub over_rejection_sha256: String,
    pub template: String,
    pub max_new_tokens: usize,
    pub span: usize,
    pub prefix_cache: bool,
    pub early_stop: bool,
    /// What the scaling multiplied (files written before it was recorded scaled the weights).
    #[serde(default)]
    pub scale_target: sl_engine::ScaleTarget,
    /// With the weights target: what the family's normalisations cancel of a weight scaling
    /// (`Decoder::weight_scaling_notes`); empty where it acts as on Llama.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scaling_notes: Vec<String>,
}

/// A text judge, or the first-token probe calibrated against one.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum LocateJudge {
    Probe(ProbeJudge),
    Text(Judge),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeJudge {
    /// Always "probe".
    pub kind: String,
    pub calibrated_against: Judge,
    #[serde(deserialize_with = "required")]
    pub calibration: Option<Calibration>,
    pub first_token_openings: Vec<String>,
    /// Agreement with the text judge on the chosen range's generated responses.
    #[serde(deserialize_with = "required")]
    pub agreement_on_chosen_range: Option<f64>,
}

// By `kind` rather than untagged, so that a missing field is named in the error.
impl<'de> Deserialize<'de> for LocateJudge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let r = if v.get("kind").and_then(|k| k.as_str()) == Some("probe") {
            serde_json::from_value(v).map(LocateJudge::Probe)
        } else {
            serde_json::from_value(v).map(LocateJudge::Text)
        };
        r.map_err(|e| D::Error::custom(format!("judge: {e}")))
    }
}

/// One scaled run (`range` "baseline" = unscaled) and the file of its judged responses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub range: String,
    pub alpha: f64,
    pub refusals: usize,
    pub seconds: f64,
    pub responses: String,
}

impl LocateFile {
    pub fn read(path: &Path) -> Result<LocateFile> {
        schema::read(path, SCHEMA_VERSION)
    }

    /// The chosen range of the file at `path`, checked against a model of `num_layers` layers
    /// (`--freeze-from`): a range outside the model names the file and the field.
    pub fn read_range(path: &Path, num_layers: usize) -> Result<LayerRange> {
        let r = Self::read(path)?.range;
        // LayerRange::new refuses a model without layers too.
        LayerRange::new(r.first, r.last, num_layers)
            .with_context(|| format!("{}: field `range`", path.display()))
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

    pub fn sample() -> Value {
        let sweep = |kind: &str| {
            json!({"kind": kind, "alpha": 1.2,
                   "tried": [[{"first": 1, "last": 2}, 5], [{"first": 1, "last": 3}, 7]],
                   "best": {"first": 1, "last": 3}})
        };
        json!({
            "schema_version": SCHEMA_VERSION,
            "meta": {"model": "m", "over_rejection": "do", "over_rejection_sha256": "ab",
                     "template": "alpaca", "max_new_tokens": 4, "span": 1, "prefix_cache": false,
                     "early_stop": true, "scale_target": "weights",
                     "scaling_notes": ["per-head q/k norms cancel the scaling of q and k"]},
            "judge": {"kind": "probe",
                      "calibrated_against": {"kind": "gcg", "phrases": ["Sorry"],
                                             "custom_list": null},
                      "calibration": {"threshold": 0.5, "agreement": 1.0, "responses": 12,
                                      "gcg_refusals": 3},
                      "first_token_openings": ["I"], "agreement_on_chosen_range": 0.75},
            "queries": 6,
            "initial_range": {"first": 1, "last": 2},
            "alpha": 1.2,
            "alpha_steps": [{"alpha": 1.2, "lower_sweep_counts": [5, 7], "std": 1.0}],
            "objective": "maximise refusals (alpha > 1)",
            "baseline": 4,
            "upper_sweep": sweep("upper"),
            "lower_sweep": sweep("lower"),
            "range": {"first": 1, "last": 3},
            "runs": [{"range": "baseline", "alpha": 1.0, "refusals": 4, "seconds": 0.1,
                      "responses": "responses/baseline@1.jsonl"}],
            "seconds": 1.5,
        })
    }

    #[test]
    fn locate_file_round_trips_and_names_missing_fields() {
        use crate::schema::tests::check_file;
        check_file::<LocateFile>(sample(), SCHEMA_VERSION, "range");
        // A text judge reads back as one.
        let mut text = sample();
        text["judge"] =
            json!({"kind": "xstest", "phrases": ["i'm sorry"], "custom_list": "my.txt"});
        check_file::<LocateFile>(text, SCHEMA_VERSION, "baseline");
    }

    #[test]
    fn an_infinite_probe_threshold_reads_back() {
        let mut v = sample();
        v["judge"]["calibration"]["threshold"] = Value::Null;
        let f: LocateFile = crate::schema::from_str(&v.to_string(), SCHEMA_VERSION).unwrap();
        let LocateJudge::Probe(p) = f.judge else {
            panic!("a probe judge")
        };
        assert_eq!(p.calibration.unwrap().threshold, f64::INFINITY);
    }

    #[test]
    fn a_judge_without_a_field_names_it() {
        let mut v = sample();
        v["judge"].as_object_mut().unwrap().remove("calibration");
        let e = crate::schema::from_str::<LocateFile>(&v.to_string(), SCHEMA_VERSION)
            .unwrap_err()
            .to_string();
        assert!(e.contains("judge: missing field `calibration`"), "{e}");
    }

    #[test]
    fn a_range_outside_the_model_names_the_file_and_field() {
        let dir = std::env::temp_dir().join(format!("sl-locate-range-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("locate.json");
        let mut v = sample();
        v["range"] = json!({"first": 2, "last": 40});
        std::fs::write(&path, v.to_string()).unwrap();
        let e = format!("{:#}", LocateFile::read_range(&path, 32).unwrap_err());
        assert!(e.contains("locate.json: field `range`"), "{e}");
        assert!(e.contains("outside the model"), "{e}");
        assert!(LocateFile::read_range(&path, 41).is_ok());
        assert!(LocateFile::read_range(&path, 0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
