//! The command line end to end on a fixture checkpoint: outputs, exit codes, no partial files.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_safety-layers"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, "Give three tips for staying healthy.\nWhat is the capital of France?\nName a colour.\n").unwrap();
    p
}

#[test]
fn inspect_prints_the_shape() {
    let out = bin().args(["inspect", "--model"]).arg(fixture("llama3")).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["family"], "llama");
    assert_eq!(v["layers"], 4);
    assert_eq!(v["storage_dtype"], "bf16");
    assert!(v["eos_token_ids"].as_array().unwrap().len() >= 2, "generation_config eos list");
}

#[test]
fn hidden_json_and_safetensors() {
    let d = tempfile::tempdir().unwrap();
    let p = prompts(d.path());
    let j = d.path().join("h.json");
    let st = bin().args(["hidden", "--model"]).arg(fixture("gemma2")).arg("--prompts").arg(&p).arg("--out").arg(&j).status().unwrap();
    assert!(st.success());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert_eq!(v["template"], "alpaca");
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    let n = v["num_entries"].as_u64().unwrap() as usize;
    assert_eq!(v["items"][0]["hidden_last"].as_array().unwrap().len(), n);
    let s = d.path().join("h.safetensors");
    let st = bin().args(["hidden", "--model"]).arg(fixture("gemma2")).arg("--prompts").arg(&p).arg("--out").arg(&s).status().unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&s).unwrap();
    let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = t.tensor("hidden_last").unwrap();
    assert_eq!(view.shape()[..2], [3, n]);
    // Same numbers in both formats.
    let first: f32 = f32::from_le_bytes(view.data()[..4].try_into().unwrap());
    let want = v["items"][0]["hidden_last"][0][0].as_f64().unwrap() as f32;
    assert_eq!(first, want);
}

#[test]
fn generate_with_and_without_scaling() {
    let d = tempfile::tempdir().unwrap();
    let p = prompts(d.path());
    let run = |extra: &[&str], out: &Path| {
        let st = bin()
            .args(["generate", "--model"])
            .arg(fixture("qwen3"))
            .arg("--prompts")
            .arg(&p)
            .args(["--max-new-tokens", "6", "--ignore-eos"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read_to_string(out).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let plain = run(&[], &d.path().join("a.jsonl"));
    assert_eq!(plain.len(), 3);
    assert!(plain.iter().all(|l| l["output_ids"].as_array().unwrap().len() == 6));
    assert!(plain[1]["prompt"].as_str().unwrap().contains("capital of France"));
    let scaled = run(&["--scale", "0-3:3.0"], &d.path().join("b.jsonl"));
    assert_ne!(plain, scaled, "scaling every layer by 3 changes the output");
}

#[test]
fn bad_input_fails_without_partial_output() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = d.path().join("out.jsonl");
    let r = bin().args(["generate", "--model"]).arg(fixture("llama")).arg("--prompts").arg(&empty).arg("--out").arg(&out).output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("empty.txt") && err.contains("no prompts"), "{err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporary files left");

    let p = prompts(d.path());
    for bad in ["5-2:1.2", "0-9:1.2", "1-2:0", "1-2:nan", "1-2"] {
        let r = bin().args(["generate", "--model"]).arg(fixture("llama")).arg("--prompts").arg(&p).args(["--scale", bad]).arg("--out").arg(&out).output().unwrap();
        assert!(!r.status.success(), "--scale {bad} must fail");
        assert!(!out.exists());
    }
    let r = bin().args(["inspect", "--model"]).arg(d.path().join("missing")).output().unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("missing"));
}

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn models_and_datasets_by_name() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let with_catalog = |c: &mut Command| {
        c.env("SAFETY_LAYERS_DATA", shared().join("data")).env("SAFETY_LAYERS_MODELS", shared().join("models")).env("XDG_CACHE_HOME", &cache);
    };
    let mut c = bin();
    with_catalog(&mut c);
    let out = c.args(["inspect", "--json", "--model", "smollm2-135m-instruct"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["layers"].as_u64(), v["hidden_size"].as_u64(), v["heads"].as_u64(), v["kv_heads"].as_u64()), (Some(30), Some(576), Some(9), Some(3)));

    let gen = d.path().join("g.jsonl");
    let mut c = bin();
    with_catalog(&mut c);
    let st = c.args(["generate", "--model"]).arg(fixture("llama")).args(["--prompts", "xstest-safe", "--limit", "3", "--max-new-tokens", "2", "--out"]).arg(&gen).status().unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read_to_string(&gen).unwrap().lines().count(), 3);

    let mut c = bin();
    with_catalog(&mut c);
    let out = c.args(["data", "verify", "paper-normal", "advbench"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("ok")).count(), 2);

    let mut c = bin();
    with_catalog(&mut c);
    let out = c.args(["generate", "--model"]).arg(fixture("llama")).args(["--prompts", "no-such-set", "--out"]).arg(&gen).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("paper-normal"), "the error lists the dataset names");
}
