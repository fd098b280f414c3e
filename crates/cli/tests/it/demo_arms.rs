//! The demo's planted organism, seeds and the paper's Table-8 controls, end to end on the tiny
//! Llama fixture (seconds): align trains only the planted layers, every arm is fine-tuned with
//! every seed, each model is evaluated as a stage of its own and merged into one table, and the
//! report pairs SPPFT with every other arm per seed and pooled.

use crate::common::{bin_with_catalog, fixture, skip_without_shared};
use serde_json::Value;

#[test]
fn planted_seeded_demo_runs_every_arm_and_pools_the_seeds() {
    if skip_without_shared(&["data/advbench", "data/paper", "data/xstest"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo");
    let run = || {
        bin_with_catalog()
            .args(["demo", "--profile", "smoke", "--model"])
            .arg(fixture("llama"))
            .args([
                "--plant", "1-2", "--seeds", "2", "--judge", "union", "--out",
            ])
            .arg(&out)
            .output()
            .unwrap()
    };
    let r = run();
    assert!(
        r.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let res: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let prov = &res["provenance"];
    assert_eq!(prov["planted"], serde_json::json!({"first": 1, "last": 2}));
    assert!(prov["stages"][1]["command"]
        .as_str()
        .unwrap()
        .contains("--train-layers 1-2"));

    // The planted claim comes first and states the Jaccard index of found vs planted.
    let claims = res["claims"].as_array().unwrap();
    assert!(claims[0]["claim"]
        .as_str()
        .unwrap()
        .starts_with("0. Positive control"));
    assert!(claims[0]["evidence"].as_str().unwrap().contains("Jaccard"));

    // Two seeds of every arm; the located range decides which Table-8 controls exist, so the
    // arms are read back from provenance and checked against the rule.
    let runs = prov["finetune_runs"].as_array().unwrap();
    let range = &res["locate"]["range"];
    let (first, last) = (
        range["first"].as_u64().unwrap(),
        range["last"].as_u64().unwrap(),
    );
    let variants: Vec<&str> = runs
        .iter()
        .filter(|r| r["seed"] == 0)
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(&variants[..3], ["full", "sppft", "control"]);
    // Smoke leaves Table 8 out; the seeds double every arm.
    assert_eq!(runs.len(), 2 * variants.len(), "{runs:?}");
    assert!(runs
        .iter()
        .any(|r| r["name"] == "ft-di-sppft-s1" && r["seed"] == 1));
    // The arms placed by the located range never overlap it; those placed by the plant (its
    // own freeze and control) are checked against the plant below.
    let by_plant =
        |r: &&Value| ["plant", "plant-control"].contains(&r["variant"].as_str().unwrap());
    for r in runs
        .iter()
        .filter(|r| r["variant"] != "sppft" && !r["freeze"].is_null() && !by_plant(r))
    {
        let (a, b) = (
            r["freeze"]["first"].as_u64().unwrap(),
            r["freeze"]["last"].as_u64().unwrap(),
        );
        assert!(b < first || a > last, "{r} overlaps {first}-{last}");
    }
    let sppft = claims
        .iter()
        .find(|c| c["claim"].as_str().unwrap().starts_with("3."))
        .unwrap();
    let arms = sppft["arms"].as_array().unwrap();
    assert!(
        arms.iter().all(|a| a["seeds"] == serde_json::json!([0, 1])),
        "{arms:?}"
    );
    let paired = sppft["paired"].as_array().unwrap();
    let pooled: Vec<&Value> = paired.iter().filter(|p| p["pooled_seeds"] == 2).collect();
    assert!(pooled.iter().any(|p| p["against"] == "full"), "{paired:?}");
    for p in &pooled {
        // The pooled table is the sum of the seeds' tables.
        let per_seed: u64 = paired
            .iter()
            .filter(|q| q["against"] == p["against"] && q["pooled_seeds"] == 0)
            .map(|q| q["counts"]["n"].as_u64().unwrap())
            .sum();
        assert_eq!(p["counts"]["n"].as_u64().unwrap(), per_seed);
    }
    assert!(sppft["evidence"].as_str().unwrap().contains("over 2 seeds"));

    // SPPFT on the plant itself: its freeze (an arm of its own, or SPPFT's when locate found
    // exactly 1-2) against full fine-tuning and its control, per seed and pooled, in claim 0.
    let plant_arm = if runs.iter().any(|r| r["variant"] == "plant") {
        for r in runs.iter().filter(by_plant) {
            let (a, b) = (
                r["freeze"]["first"].as_u64().unwrap(),
                r["freeze"]["last"].as_u64().unwrap(),
            );
            match r["variant"].as_str().unwrap() {
                "plant" => assert_eq!((a, b), (1, 2)),
                _ => assert!(b < 1 || a > 2, "{r} overlaps the plant"),
            }
        }
        "plant"
    } else {
        assert_eq!(
            (first, last),
            (1, 2),
            "no plant arm although locate missed the plant"
        );
        "sppft"
    };
    // Its control is whichever arm freezes the range beside the plant that provenance names.
    let pc = &prov["plant_control"];
    let control_arm = runs
        .iter()
        .find(|r| r["freeze"] == *pc)
        .map(|r| r["variant"].as_str().unwrap())
        .expect("an arm freezes the plant's control range");
    let plant_paired = claims[0]["paired"].as_array().unwrap();
    for against in ["full", control_arm] {
        assert!(
            plant_paired.iter().any(|p| p["arm"] == plant_arm
                && p["against"] == against
                && p["pooled_seeds"] == 2),
            "{against}: {plant_paired:?}"
        );
    }
    assert!(claims[0]["evidence"]
        .as_str()
        .unwrap()
        .contains("Fine-tuned with the plant frozen"));

    // Every model has its own eval stage; the table merges them; the judge is the one asked.
    let models = res["eval"]["models"].as_array().unwrap();
    assert_eq!(models.len(), 2 + runs.len());
    assert_eq!(res["eval"]["judge"]["kind"], "union");
    assert!(out.join("eval-parts/ft-di-control-s1/eval.json").is_file());

    // A lost merged table is rebuilt from the cached per-model stages: nothing is generated
    // again.
    std::fs::remove_dir_all(out.join("eval")).unwrap();
    let r = run();
    assert!(r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("demo: eval-ft-di-full-s1: cached"), "{err}");
    assert!(
        err.contains("demo: eval: safety-layers eval --responses"),
        "{err}"
    );
}

#[test]
fn bad_demo_flags_fail_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo");
    for (flags, want) in [
        (vec!["--seeds", "0"], "--seeds 0"),
        (vec!["--judge", "gcgg"], "--judge: unknown judge `gcgg`"),
        (vec!["--plant", "ten-14"], "--plant: layer range `ten-14`"),
    ] {
        let r = bin_with_catalog()
            .args(["demo", "--profile", "smoke", "--model"])
            .arg(fixture("llama"))
            .args(&flags)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!r.status.success(), "{flags:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?} wrote {}", out.display());
    }
}
