//! `safety-layers export`: the written configs select exactly the right parameter names of real
//! model shapes (checked in Python against transformers, see export_names.py), and bad requests
//! fail with a clear message and leave no output behind.

// The default --data is a catalog name: bin_with_catalog points the catalog at the shared
// datasets if the environment does not.
use crate::common::bin_with_catalog as bin;
use crate::common::{fixture, shared, skip_without_python_peers, skip_without_shared};
use std::path::Path;
use std::process::{Command, Output};

fn export(args: &[&str], model: &Path, out: &Path) -> Output {
    bin()
        .arg("export")
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs tests/`script` with python3 on this binary and `args` (the datasets found through
/// SAFETY_LAYERS_DATA); returns its exit and its printed output (also printed here).
fn python_check(script: &str, args: &[std::path::PathBuf]) -> (Output, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new("python3")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_safety-layers"))
        .args(args)
        .env("SAFETY_LAYERS_DATA", shared().join("data"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    println!("{text}");
    (out, text)
}

#[test]
fn exported_configs_select_exactly_the_frozen_names_of_real_models() {
    if skip_without_shared(&["data"]) || skip_without_python_peers() {
        return;
    }
    let (out, text) = python_check("export_names.py", &[]);
    assert!(
        out.status.success(),
        "export_names.py failed (needs torch, transformers and PyYAML):\n{text}"
    );
    assert!(text.contains("33 exports checked"), "{text}");
}

#[test]
fn each_format_writes_its_files_and_the_plan() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (format, file) in [
        ("axolotl", "axolotl.yaml"),
        ("peft", "adapter_config.json"),
        ("hf-trainer", "train_sppft.py"),
    ] {
        let out = d.path().join(format);
        let o = export(
            &["--freeze", "1-2", "--format", format],
            &fixture("phi3"),
            &out,
        );
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        assert!(
            out.join(file).is_file() && out.join("README.md").is_file(),
            "{format}"
        );
        let plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("freeze_plan.json")).unwrap())
                .unwrap();
        let frozen: Vec<&str> = plan["frozen_parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            frozen.len(),
            2 * 4,
            "Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj per layer"
        );
        assert!(frozen.contains(&"model.layers.2.mlp.gate_up_proj.weight"));
        assert_eq!(plan["model"]["family"], "phi3");
        assert_eq!(
            plan["recipe"]["lr"], 6e-4,
            "the paper's Phi-3 learning rate"
        );
    }
    let yaml = std::fs::read_to_string(d.path().join("axolotl/axolotl.yaml")).unwrap();
    assert!(yaml.contains("  - \"^model.layers.(?:0|3).\""), "{yaml}");
    assert!(yaml.contains("learning_rate: 0.0006"), "{yaml}");
    // --freeze-from reads locate.json's chosen range (0-1: `locate` on the qwen2 fixture).
    let loc = fixture("locate/locate.json");
    let out = d.path().join("from-locate");
    let o = bin()
        .args([
            "export",
            "--format",
            "axolotl",
            "--freeze-modules",
            "mlp",
            "--model",
        ])
        .arg(fixture("qwen2"))
        .arg("--freeze-from")
        .arg(&loc)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("freeze_plan.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            plan["freeze"]["first"].as_u64(),
            plan["freeze"]["last"].as_u64()
        ),
        (Some(0), Some(1))
    );
    assert_eq!(plan["frozen_parameters"].as_array().unwrap().len(), 2 * 3);
}

#[test]
fn a_gguf_gives_its_shape_from_metadata_and_needs_a_base_model() {
    if skip_without_shared(&["models/SmolLM2-135M-Instruct.Q4_1.gguf"]) {
        return;
    }
    let gguf = shared().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = export(&["--freeze", "3-7", "--format", "hf-trainer"], &gguf, &out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("give --base-model"), "{}", stderr(&o));
    assert!(!out.exists());
    let t0 = std::time::Instant::now();
    let o = export(
        &[
            "--freeze",
            "3-7",
            "--format",
            "hf-trainer",
            "--base-model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ],
        &gguf,
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(t0.elapsed().as_secs_f64() < 10.0, "only the header is read");
    let script = std::fs::read_to_string(out.join("train_sppft.py")).unwrap();
    assert!(script.contains("BASE_MODEL = \"HuggingFaceTB/SmolLM2-135M-Instruct\""));
    assert!(script.contains("\"model.layers.7.mlp.down_proj.weight\","));
    assert!(!script.contains("\"model.layers.8."));
}

#[test]
fn bad_requests_fail_clearly_and_write_nothing() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let llama = fixture("llama3");
    let bad_locate = d.path().join("bad.json");
    std::fs::write(&bad_locate, r#"{"schema_version": 1, "alpha": 1.2}"#).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--freeze", "1-2", "--format", "deepspeed"],
            "unknown --format `deepspeed` (expected axolotl, peft or hf-trainer)",
        ),
        (
            vec!["--freeze", "2-4", "--format", "axolotl"],
            "outside the model's layers 0-3",
        ),
        (
            vec!["--freeze", "3-1", "--format", "axolotl"],
            "the first layer is after the last",
        ),
        (
            vec!["--freeze", "x-2", "--format", "axolotl"],
            "is not a layer number",
        ),
        (vec!["--format", "axolotl"], "--freeze I-J or --freeze-from"),
        (
            vec![
                "--freeze",
                "1-2",
                "--format",
                "axolotl",
                "--freeze-modules",
                "attn,norm",
            ],
            "unknown --freeze-modules entry `norm`",
        ),
        (
            vec!["--freeze", "0-3", "--format", "peft"],
            "covers every layer",
        ),
        (
            vec![
                "--freeze",
                "1-2",
                "--format",
                "axolotl",
                "--lr-schedule",
                "step",
            ],
            "unknown --lr-schedule `step`",
        ),
        (
            vec![
                "--freeze",
                "1-2",
                "--format",
                "axolotl",
                "--precision",
                "fp8",
            ],
            "unknown --precision `fp8`",
        ),
    ];
    for (args, want) in cases {
        let o = export(&args, &llama, &out);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    let o = bin()
        .args(["export", "--format", "axolotl", "--model"])
        .arg(&llama)
        .arg("--freeze-from")
        .arg(&bad_locate)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("bad.json: missing field"),
        "{}",
        stderr(&o)
    );
    let o = export(
        &["--freeze", "1-2", "--format", "axolotl"],
        &d.path().join("nowhere"),
        &out,
    );
    assert!(stderr(&o).contains("not a catalog name"), "{}", stderr(&o));
    assert!(!out.exists());
    // An existing, non-empty output directory is never overwritten.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = export(&["--freeze", "1-2", "--format", "axolotl"], &llama, &out);
    assert!(
        stderr(&o).contains("already exists and is not empty"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // No staging directory is left beside it either.
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

/// The scale-out path run for real (scaleout_run.py): the exported Hugging Face Trainer script
/// trains 2 steps with the plan's tensors frozen and our losses; PEFT wraps exactly the planned
/// modules; axolotl validates its config where it is installed.
#[test]
fn exported_trainer_script_trains_like_finetune() {
    if skip_without_shared(&["data/paper/Normal_dataset.json"]) || skip_without_python_peers() {
        return;
    }
    let (out, text) = python_check(
        "scaleout_run.py",
        &[
            fixture("llama"),
            shared().join("data/paper/Normal_dataset.json"),
        ],
    );
    assert!(
        out.status.success(),
        "scaleout_run.py failed (needs torch, transformers, accelerate, peft):\n{text}"
    );
    assert!(text.contains("scale-out checks passed"), "{text}");
}
