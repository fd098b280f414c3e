//! `finetune` from the command line: a run killed mid-way and resumed ends with byte-identical
//! weights and the same log; the output loads back; bad inputs fail clearly without output.

use crate::common::{bin, root, shared, skip_without_shared};
use std::path::{Path, PathBuf};

fn data(dir: &Path) -> PathBuf {
    let all: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(shared().join("data/paper/Normal_dataset.json")).unwrap(),
    )
    .unwrap();
    let p = dir.join("d.json");
    std::fs::write(&p, serde_json::to_string(&all[..14]).unwrap()).unwrap();
    p
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["finetune", "--model"])
        .arg(root().join("tests/fixtures/qwen2"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--freeze",
            "1-2",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
        ])
        .args([
            "--max-len",
            "48",
            "--holdout",
            "2",
            "--save-every",
            "2",
            "--dtype",
            "f32",
            "--weight-decay",
            "0.01",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn losses(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let loss = v.get("loss").or(v.get("holdout_loss")).unwrap().to_string();
            (v["step"].as_u64().unwrap(), loss)
        })
        .collect()
}

#[test]
fn killed_and_resumed_equals_uninterrupted() {
    if skip_without_shared(&["data/paper/Normal_dataset.json"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let r = train(&data, &a, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // 12 training records, micro-batches of 2, 2 per step: 3 steps per epoch, 6 in all.
    let steps: Vec<u64> = losses(&a).iter().map(|(s, _)| *s).collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 3, 4, 5, 6, 6],
        "step lines then a held-out line per epoch"
    );
    assert!(
        !a.join("checkpoints").exists(),
        "checkpoints are removed after a finished run"
    );

    let r = train(&data, &b, &["--abort-after-step", "5"]);
    assert!(!r.status.success(), "the run should have been aborted");
    assert!(
        b.join("checkpoints/step-00000004/state.json").is_file(),
        "the step-4 checkpoint survives the kill"
    );
    assert!(
        !b.join("config.json").exists(),
        "no model is written by an interrupted run"
    );
    let r = train(&data, &b, &["--resume"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (wa, wb) = (
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
    );
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(losses(&a), losses(&b));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("finetune.json")).unwrap()).unwrap();
    assert_eq!(s["resumed"], true);
    assert_eq!(s["frozen_tensors_identical"], true);

    // The output is a checkpoint this tool (and transformers) loads.
    let r = bin()
        .args(["inspect", "--json", "--model"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // Resuming with other settings is refused.
    let c = d.path().join("c");
    let _ = train(&data, &c, &["--abort-after-step", "2"]);
    let r = train(&data, &c, &["--resume", "--seed", "7"]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("different settings"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    if skip_without_shared(&["data/paper/Normal_dataset.json"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = data(d.path());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--freeze", "2-9"], "outside"),
        (vec!["--freeze", "3-1"], "3-1"),
        (vec!["--holdout", "14"], "--holdout"),
        (vec!["--lr=-1"], "--lr"),
        (vec!["--freeze-modules", "attn,norms"], "norms"),
        (vec!["--lr-schedule", "step"], "step"),
        (vec!["--mixed-precision", "fp8"], "--mixed-precision"),
    ];
    for (i, (args, needle)) in cases.into_iter().enumerate() {
        let out = d.path().join(format!("o{i}"));
        let mut a = vec!["--epochs", "1"];
        a.extend(args.iter());
        // --freeze given twice would be a clap error: replace the default by putting ours last.
        let r = bin()
            .args(["finetune", "--model"])
            .arg(root().join("tests/fixtures/llama"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--holdout", "2"])
            .args(&a)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "case {i} {args:?} should fail");
        assert!(err.contains(needle), "case {i}: {err}");
        assert!(!out.join("config.json").exists(), "case {i} wrote a model");
    }
    let missing = bin()
        .args(["finetune", "--model"])
        .arg(root().join("tests/fixtures/llama"))
        .args(["--data", "no-such-data", "--out"])
        .arg(d.path().join("x"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-data"));
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, "[{\"instruction\": \"x\"}]").unwrap();
    let r = bin()
        .args(["finetune", "--model"])
        .arg(root().join("tests/fixtures/llama"))
        .arg("--data")
        .arg(&bad)
        .arg("--out")
        .arg(d.path().join("y"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("output"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}
