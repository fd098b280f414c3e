//! `locate` on the real SmolLM2 GGUF: every count it reports equals what `generate --scale`
//! followed by `judge` gives for the same range (no prefix cache, no early stop on that side).

use crate::common::{bin, shared, skip_without_shared};

#[test]
fn locate_counts_equal_generate_plus_judge() {
    if skip_without_shared(&["data", "models/SmolLM2-135M-Instruct.Q4_1.gguf"]) {
        return;
    }
    let model = shared().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let d = tempfile::tempdir().unwrap();
    // The first 100 over-rejection queries (the quality bar), as a file both commands read.
    let text =
        std::fs::read_to_string(shared().join("data/paper/Over_rejection_dataset.csv")).unwrap();
    let queries: Vec<&str> = text.lines().take(100).collect();
    let qfile = d.path().join("do.txt");
    std::fs::write(&qfile, queries.join("\n")).unwrap();
    let out = d.path().join("loc");
    let r = bin()
        .args(["locate", "--model"])
        .arg(&model)
        .arg("--over-rejection")
        .arg(&qfile)
        .args([
            "--initial",
            "10-15",
            "--alpha",
            "1.2",
            "--span",
            "1",
            "--judge",
            "xstest",
            "--max-new-tokens",
            "16",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let loc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("locate.json")).unwrap()).unwrap();
    assert!(out.join("locate.csv").exists() && out.join("locate.svg").exists());
    let runs = loc["runs"].as_array().unwrap();
    assert!(runs.len() >= 5, "baseline + both sweeps");
    for run in runs {
        let range = run["range"].as_str().unwrap();
        let gen = d.path().join(format!("{range}.jsonl"));
        let mut cmd = bin();
        cmd.args(["generate", "--model"])
            .arg(&model)
            .arg("--prompts")
            .arg(&qfile)
            .args(["--max-new-tokens", "16", "--out"])
            .arg(&gen);
        if range != "baseline" {
            cmd.args(["--scale", &format!("{range}:1.2")]);
        }
        assert!(cmd.status().unwrap().success());
        let j = bin()
            .args(["judge", "--judge", "xstest", "--responses"])
            .arg(&gen)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
        assert_eq!(
            v["refusals"], run["refusals"],
            "range {range}: locate vs generate + judge"
        );
        assert!(out.join(run["responses"].as_str().unwrap()).exists());
    }
    // Bad input: a range outside the model, i > j, a bad alpha, an empty set.
    for args in [
        vec!["--initial", "25-40"],
        vec!["--initial", "12-10"],
        vec!["--initial", "10-15", "--alpha", "0"],
        vec!["--initial", "10-15", "--alpha", "inf"],
    ] {
        let r = bin()
            .args(["locate", "--model"])
            .arg(&model)
            .arg("--over-rejection")
            .arg(&qfile)
            .args(&args)
            .arg("--out")
            .arg(d.path().join("bad"))
            .output()
            .unwrap();
        assert!(!r.status.success(), "{args:?} must fail");
        assert!(!d.path().join("bad").join("locate.json").exists());
    }
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let r = bin()
        .args(["locate", "--model"])
        .arg(&model)
        .arg("--over-rejection")
        .arg(&empty)
        .args(["--initial", "10-15", "--out"])
        .arg(d.path().join("bad"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no prompts"));
}
