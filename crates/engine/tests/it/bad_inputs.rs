//! Bad checkpoints and prompt files give clear errors that name the file and the field.

use crate::common::{copy_fixture, fixture, shared, skip_without_shared};
use sl_engine::text::prompts::read_prompts;
use sl_engine::Model;
use std::path::{Path, PathBuf};

fn llama_fixture() -> PathBuf {
    fixture("llama")
}

fn qwen2_fixture() -> PathBuf {
    fixture("qwen2")
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn truncated_safetensors() {
    let d = copy_fixture(&llama_fixture());
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn missing_shard() {
    let d = copy_fixture(&qwen2_fixture());
    let shard = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .expect("the qwen2 fixture is sharded");
    std::fs::remove_file(d.path().join(&shard)).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains(&shard) && e.contains("model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn config_disagrees_with_weights() {
    let d = copy_fixture(&llama_fixture());
    let p = d.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["intermediate_size"] = serde_json::json!(v["intermediate_size"].as_u64().unwrap() * 2);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("intermediate_size"),
        "{e}"
    );
}

#[test]
fn missing_tokenizer() {
    let d = copy_fixture(&llama_fixture());
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn unknown_architecture() {
    let d = copy_fixture(&llama_fixture());
    let p = d.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("FalconForCausalLM")
            && e.contains("LlamaForCausalLM")
            && e.contains("Phi3ForCausalLM"),
        "{e}"
    );
}

#[test]
fn missing_config_and_missing_dir() {
    let d = copy_fixture(&llama_fixture());
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert!(load_err(d.path()).contains("config.json"));
    assert!(load_err(&d.path().join("nope")).contains("no such file"));
}

#[test]
fn prompt_files() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = format!("{:#}", read_prompts(&empty, None).unwrap_err());
    assert!(e.contains("empty.txt") && e.contains("no prompts"), "{e}");

    let csv = d.path().join("p.csv");
    std::fs::write(&csv, "goal,target\nDo a thing,Sure\n").unwrap();
    let e = format!("{:#}", read_prompts(&csv, Some("prompt")).unwrap_err());
    assert!(
        e.contains("p.csv") && e.contains("`prompt`") && e.contains("goal, target"),
        "{e}"
    );
    assert_eq!(
        read_prompts(&csv, Some("goal")).unwrap()[0].instruction,
        "Do a thing"
    );

    let jsonl = d.path().join("p.jsonl");
    std::fs::write(&jsonl, "{\"instruction\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    let e = format!("{:#}", read_prompts(&jsonl, None).unwrap_err());
    assert!(e.contains("line 2") && e.contains("instruction"), "{e}");
}

#[test]
fn paper_prompt_sets() {
    if skip_without_shared(&["data/paper"]) {
        return;
    }
    let shared = shared().join("data/paper");
    let normal = read_prompts(&shared.join("cos_normal.csv"), None).unwrap();
    assert_eq!(
        normal.len(),
        100,
        "cos_normal.csv (last line without newline)"
    );
    assert_eq!(
        read_prompts(&shared.join("cos_malicious.csv"), None)
            .unwrap()
            .len(),
        100
    );
    assert_eq!(
        read_prompts(&shared.join("Over_rejection_dataset.csv"), None)
            .unwrap()
            .len(),
        731
    );
    let dn = read_prompts(&shared.join("Normal_dataset.json"), None).unwrap();
    assert_eq!(dn.len(), 1000);
    assert!(dn
        .iter()
        .any(|r| r.input.as_deref().is_some_and(|s| !s.is_empty())));
    assert!(
        normal
            .iter()
            .any(|r| r.instruction.contains("\"they are\"")),
        "quoted CSV fields are unquoted"
    );
}
