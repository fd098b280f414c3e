//! The demo's science: its profiles, the control range it freezes, and the provenance and stage
//! markers it records. The CLI runs the stages (each one of its own command lines) and caches
//! them; the report reads what they wrote.

pub mod profiles;

pub use profiles::{profile, Profile};

use crate::schema::{self, required};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sl_engine::io::atomic::write_atomic;
use sl_engine::LayerRange;
use std::collections::BTreeMap;
use std::path::Path;

/// The control freeze for a located range `first..=last` (the paper's Table 8 freezes such
/// ranges): as wide and never overlapping it, at the bottom if it fits below, else at the top.
/// Where no equally wide range fits on either side, the larger side's layers, marked narrower
/// (the report says so); an error where the range covers every layer.
pub fn control_range(first: usize, last: usize, layers: usize) -> Result<ControlRange> {
    if first > last || last >= layers {
        anyhow::bail!("control range: layers {first}-{last} are not a range of {layers} layers");
    }
    let w = last - first + 1;
    let (below, above) = (first, layers - 1 - last);
    let (a, b, narrower) = if w <= below {
        (0, w - 1, false)
    } else if w <= above {
        (layers - w, layers - 1, false)
    } else if below == 0 && above == 0 {
        anyhow::bail!(
            "the located range {first}-{last} covers all {layers} layers: no control range can \
             be frozen beside it"
        );
    } else if below >= above {
        (0, below - 1, true)
    } else {
        (last + 1, layers - 1, true)
    };
    Ok(ControlRange {
        range: LayerRange { first: a, last: b },
        narrower,
    })
}

/// The fine-tuning arms for a located range `first..=last` of `layers`: full fine-tuning,
/// SPPFT (the range frozen), the equally wide control, and with `table8` the paper's Table-8
/// controls: every layer below the range frozen, and every layer above it (each left out where
/// no layer lies on that side, or where it would repeat the control). With a `plant` (the
/// positive control) also the planted layers frozen and their own equally wide control, each
/// left out where it would repeat an arm's freeze (locate found exactly the plant).
pub fn finetune_arms(
    first: usize,
    last: usize,
    layers: usize,
    table8: bool,
    plant: Option<LayerRange>,
) -> Result<Vec<(&'static str, Option<LayerRange>)>> {
    let control = control_range(first, last, layers)?.range;
    let mut arms = vec![
        ("full", None),
        ("sppft", Some(LayerRange { first, last })),
        ("control", Some(control)),
    ];
    if table8 {
        let below = (first > 0).then(|| LayerRange {
            first: 0,
            last: first - 1,
        });
        let above = (last + 1 < layers).then(|| LayerRange {
            first: last + 1,
            last: layers - 1,
        });
        for (name, r) in [("below", below), ("above", above)] {
            if let Some(r) = r.filter(|r| *r != control) {
                arms.push((name, Some(r)));
            }
        }
    }
    if let Some(p) = plant {
        let p_control = control_range(p.first, p.last, layers)?.range;
        for (name, r) in [("plant", p), ("plant-control", p_control)] {
            if !arms.iter().any(|(_, f)| *f == Some(r)) {
                arms.push((name, Some(r)));
            }
        }
    }
    Ok(arms)
}

/// Jaccard index of two layer ranges: shared layers over layers in either.
pub fn jaccard(a: LayerRange, b: LayerRange) -> f64 {
    let shared = (a.last.min(b.last) + 1).saturating_sub(a.first.max(b.first));
    let union = (a.last - a.first + 1) + (b.last - b.first + 1) - shared;
    shared as f64 / union as f64
}

/// A control freeze and whether it had to be narrower than the located range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlRange {
    pub range: LayerRange,
    pub narrower: bool,
}

/// One stage's record in results.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub command: String,
    /// sha256 of the tool version, the command and the keys of the stages it reads.
    pub key: String,
    pub seconds: f64,
    pub cached: bool,
}

pub const STAGE_FILE: &str = ".stage.json";
pub const STAGE_SCHEMA_VERSION: u32 = 1;

/// A finished stage's marker in its output directory: a rerun with the same key reuses the
/// output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageMarker {
    pub schema_version: u32,
    pub key: String,
    pub seconds: f64,
    pub command: String,
}

impl StageMarker {
    pub fn new(rec: &StageRecord) -> StageMarker {
        StageMarker {
            schema_version: STAGE_SCHEMA_VERSION,
            key: rec.key.clone(),
            seconds: rec.seconds,
            command: rec.command.clone(),
        }
    }

    pub fn read(path: &Path) -> Result<StageMarker> {
        schema::read(path, STAGE_SCHEMA_VERSION)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, schema::to_pretty(self)?.as_bytes())
    }
}

/// One fine-tuning run of the demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneRun {
    /// Its stage and directory name, e.g. `ft-di-sppft`.
    pub name: String,
    /// The training set (a dataset name).
    pub data: String,
    /// "full", "sppft", "control", "below" or "above".
    pub variant: String,
    #[serde(deserialize_with = "required")]
    pub freeze: Option<LayerRange>,
    /// The fine-tune's seed (absent in results written before seeds: the demo's seed, 0).
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseModel {
    /// As given on the command line.
    pub name: String,
    pub path: String,
    /// sha256 of the file, or "directory".
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    #[serde(deserialize_with = "required")]
    pub cpu_model: Option<String>,
    #[serde(deserialize_with = "required")]
    pub memory_gib: Option<f64>,
    pub os: String,
    pub arch: String,
}

impl Machine {
    /// This machine (CPU model and memory where /proc tells them).
    pub fn current() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        });
        let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
                    / 1048576.0
            })
        });
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: cpu,
            memory_gib: mem,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
        }
    }
}

/// How the demo's numbers were made: results.json's `provenance`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// `safety-layers <version>`.
    pub tool: String,
    pub profile: Profile,
    pub seed: u64,
    pub base_model: BaseModel,
    /// sha256 of every file of every dataset, by dataset name.
    pub datasets_sha256: BTreeMap<String, Vec<String>>,
    pub machine: Machine,
    pub stages: Vec<StageRecord>,
    pub control_range: LayerRange,
    /// The control range is narrower than the located one (no equally wide range fitted beside
    /// it); absent in results written before it was recorded.
    #[serde(default)]
    pub control_narrower: bool,
    /// `--plant`: the layers `align` trained (all others frozen), the positive control the
    /// pipeline should recover; absent when the organism was aligned as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planted: Option<LayerRange>,
    /// `--plant`: the equally wide control freeze beside the plant (`control_range` of it), which
    /// an arm of the run freezes (its own, or another arm with the same freeze).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plant_control: Option<LayerRange>,
    pub finetune_runs: Vec<FinetuneRun>,
    pub total_seconds: f64,
    /// `demo --report-only`: the build that rebuilt report.html and results.json
    /// from these stages, when it is not the one that ran them (`tool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_rebuilt_by: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn control_ranges_are_equally_wide_and_disjoint() {
        let r = |i, j, n| {
            let c = control_range(i, j, n).unwrap();
            (c.range.first, c.range.last, c.narrower)
        };
        assert_eq!(r(8, 10, 30), (0, 2, false));
        assert_eq!(r(1, 5, 30), (25, 29, false));
        assert_eq!(r(0, 0, 4), (3, 3, false));
        for (i, j) in [(8, 10), (1, 5), (0, 0), (3, 3)] {
            let (a, b, _) = r(i, j, 30);
            assert_eq!(b - a, j - i);
            assert!(b < i || a > j);
        }
        // No equally wide range fits: the larger side, marked narrower, never overlapping.
        assert_eq!(r(5, 25, 30), (0, 4, true));
        assert_eq!(r(3, 20, 30), (21, 29, true));
        for n in 2..12 {
            for i in 0..n {
                for j in i..n {
                    match control_range(i, j, n) {
                        Ok(c) => {
                            let (a, b) = (c.range.first, c.range.last);
                            assert!(b < i || a > j, "{i}-{j} of {n}: {a}-{b} overlaps");
                            assert!(b < n && a <= b);
                            assert_eq!(c.narrower, b - a < j - i, "{i}-{j} of {n}");
                        }
                        Err(e) => {
                            assert!((i, j) == (0, n - 1), "{i}-{j} of {n}: {e}");
                            assert!(e.to_string().contains("covers all"), "{e}");
                        }
                    }
                }
            }
        }
    }

    pub fn provenance_sample() -> Value {
        json!({
            "tool": "safety-layers 0.1.0",
            "profile": serde_json::to_value(profile("smoke").unwrap()).unwrap(),
            "seed": 0,
            "base_model": {"name": "smollm2", "path": "/m.gguf", "sha256": "ab"},
            "datasets_sha256": {"advbench": ["cd"]},
            "machine": {"cpus": 2, "cpu_model": null, "memory_gib": 7.5, "os": "linux",
                        "arch": "x86_64"},
            "stages": [{"name": "align", "command": "safety-layers align", "key": "ef",
                        "seconds": 1.5, "cached": false}],
            "control_range": {"first": 0, "last": 1},
            "control_narrower": false,
            "finetune_runs": [{"name": "ft-di-full", "data": "finetune-implicit", "variant": "full",
                               "freeze": null, "seed": 0},
                              {"name": "ft-di-sppft", "data": "finetune-implicit",
                               "variant": "sppft", "freeze": {"first": 2, "last": 3}, "seed": 0}],
            "total_seconds": 60.5,
        })
    }

    #[test]
    fn arms_never_overlap_the_range_and_table8_adds_both_sides() {
        let names = |i, j, n, t8| {
            finetune_arms(i, j, n, t8, None)
                .unwrap()
                .into_iter()
                .map(|(v, r)| (v, r.map(|r| (r.first, r.last))))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(10, 14, 30, true),
            vec![
                ("full", None),
                ("sppft", Some((10, 14))),
                ("control", Some((0, 4))),
                ("below", Some((0, 9))),
                ("above", Some((15, 29))),
            ]
        );
        assert_eq!(names(10, 14, 30, false).len(), 3);
        // Nothing below layer 0; the layers below 2-3 are exactly the control 0-1.
        assert_eq!(names(0, 3, 30, true).last().unwrap().0, "above");
        assert_eq!(names(0, 3, 30, true).len(), 4);
        assert_eq!(names(2, 3, 30, true).len(), 4);
        for (v, r) in finetune_arms(5, 25, 30, true, None).unwrap() {
            if let (Some(r), true) = (r, v != "sppft") {
                assert!(r.last < 5 || r.first > 25, "{v} {r}");
            }
        }
    }

    #[test]
    fn a_plant_adds_its_own_freeze_and_control_unless_an_arm_has_them() {
        let plant = |first, last| Some(LayerRange { first, last });
        let arms = finetune_arms(23, 24, 30, true, plant(10, 14)).unwrap();
        let tail: Vec<_> = arms[arms.len() - 2..]
            .iter()
            .map(|(v, r)| (*v, r.map(|r| (r.first, r.last))))
            .collect();
        assert_eq!(
            tail,
            vec![("plant", Some((10, 14))), ("plant-control", Some((0, 4)))]
        );
        // Located exactly the plant: SPPFT and the control already freeze those ranges.
        let same = finetune_arms(10, 14, 30, true, plant(10, 14)).unwrap();
        assert_eq!(same, finetune_arms(10, 14, 30, true, None).unwrap());
    }

    #[test]
    fn jaccard_of_ranges_by_hand() {
        let r = |first, last| LayerRange { first, last };
        assert_eq!(jaccard(r(10, 14), r(10, 14)), 1.0);
        assert_eq!(jaccard(r(10, 14), r(15, 20)), 0.0);
        // 12-14 shared (3) of 10-16 (7).
        assert!((jaccard(r(10, 14), r(12, 16)) - 3.0 / 7.0).abs() < 1e-12);
        assert!((jaccard(r(0, 29), r(10, 14)) - 5.0 / 30.0).abs() < 1e-12);
    }

    #[test]
    fn stage_marker_round_trips_and_names_missing_fields() {
        let v = json!({"schema_version": STAGE_SCHEMA_VERSION, "key": "ab", "seconds": 2.5,
                       "command": "safety-layers cosine"});
        crate::schema::tests::check_file::<StageMarker>(v, STAGE_SCHEMA_VERSION, "key");
    }

    #[test]
    fn provenance_reads_back() {
        let v = provenance_sample();
        let p: Provenance = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap(), v);
        let mut w = v.clone();
        w["profile"].as_object_mut().unwrap().remove("eval_limit");
        let e = serde_json::from_value::<Provenance>(w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`eval_limit`"), "{e}");
    }
}
