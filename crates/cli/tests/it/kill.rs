//! SIGKILL at seeded moments of `convert`, `finetune`, `align`, `demo` and `eval`: after each
//! kill the output location holds a complete output or none (every file there parses whole, a
//! `config.json` only in a complete model directory, temporaries only under `.<name>.tmp-<pid>`
//! names), and a rerun completes with the outputs of an uninterrupted run.
//!
//! Each command first runs uninterrupted into the same path the killed runs use (outputs record
//! their paths), so its deterministic files are the reference; kill moments are fractions of that
//! run's wall time drawn from a fixed seed.

use crate::common::{bin, bin_with_catalog, fixture, skip_without_shared};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kill moments as fractions of a run's wall time (splitmix64 of a fixed seed).
fn moments(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// Runs `cmd` to the end; returns its wall time.
fn run_ok(mut cmd: Command) -> Duration {
    let t0 = Instant::now();
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    t0.elapsed()
}

/// Runs `cmd` and SIGKILLs it after `delay`; true when the kill landed (false: it had exited,
/// successfully, before).
fn run_killed(mut cmd: Command, delay: Duration) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the run failed on its own: {status}");
            return false;
        }
        if t0.elapsed() >= delay {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A writer's temporary: `.<name>.tmp-<pid>`.
fn is_temporary(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
}

/// Every path under `dir` (recursively), temporaries included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.map(|e| e.unwrap().path()) {
            if e.is_dir() {
                out.extend(walk(&e));
            }
            out.push(e);
        }
    }
    out
}

/// A safetensors file is whole: its header parses and its data ends where the file ends.
fn check_safetensors(p: &Path, bytes: &[u8]) {
    assert!(bytes.len() >= 8, "{}: truncated", p.display());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(8 + n <= bytes.len(), "{}: header truncated", p.display());
    let head: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .unwrap_or_else(|e| panic!("{}: header: {e}", p.display()));
    let end = head
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| t["data_offsets"][1].as_u64().unwrap() as usize)
        .max()
        .unwrap_or(0);
    assert_eq!(8 + n + end, bytes.len(), "{}: data truncated", p.display());
}

/// The invariants after a kill: outside temporaries every file parses whole, and a directory
/// with a `config.json` holds the complete model of `reference` (same bytes).
fn check_after_kill(out: &Path, reference: &BTreeMap<PathBuf, Vec<u8>>) {
    for p in walk(out) {
        if p.ancestors().any(is_temporary) || p.is_dir() {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "json" => {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{} is half-written: {e}", p.display()));
            }
            "jsonl" => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.is_empty() || text.ends_with('\n'), "{}", p.display());
                for l in text.lines() {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|e| panic!("{}: half a line: {e}", p.display()));
                }
            }
            "safetensors" => check_safetensors(&p, &bytes),
            "svg" => assert!(String::from_utf8_lossy(&bytes).contains("</svg>")),
            "html" => assert!(String::from_utf8_lossy(&bytes).contains("</html>")),
            _ => {}
        }
        if p.file_name().unwrap() == "config.json" {
            let dir = p.parent().unwrap();
            for file in ["config.json", "model.safetensors"] {
                let rel = dir.join(file).strip_prefix(out).unwrap().to_path_buf();
                if let Some(want) = reference.get(&rel) {
                    let got = std::fs::read(dir.join(file)).unwrap_or_default();
                    assert!(
                        &got == want,
                        "{} has a config.json but its {file} is not the complete one",
                        dir.display()
                    );
                }
            }
        }
    }
}

/// The files under `out` (relative paths) whose names are in `keep`, with their bytes.
fn snapshot(out: &Path, keep: &[&str]) -> BTreeMap<PathBuf, Vec<u8>> {
    walk(out)
        .into_iter()
        .filter(|p| p.is_file() && !p.ancestors().any(is_temporary))
        .filter(|p| keep.contains(&p.file_name().unwrap().to_str().unwrap()))
        .map(|p| {
            (
                p.strip_prefix(out).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// After a completed rerun: the deterministic files equal the reference and no temporary is
/// left, not even a killed run's.
fn check_rerun(out: &Path, keep: &[&str], reference: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
    let got = snapshot(out, keep);
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(reference), "{what}: files differ");
    for (k, v) in reference {
        assert!(
            &got[k] == v,
            "{what}: {} differs from the uninterrupted run",
            k.display()
        );
    }
    let parent = out.parent().unwrap();
    let left: Vec<PathBuf> = walk(parent)
        .into_iter()
        .filter(|p| is_temporary(p))
        .collect();
    assert!(left.is_empty(), "{what}: stale temporaries {left:?}");
}

/// What a writer killed earlier (pid 4294967295: no such process) leaves beside `dest`: a
/// staging directory with a half-written config.json, or a half-written file. A rerun must
/// neither trust it nor leave it behind.
fn plant_dead_temporary(dest: &Path, is_dir: bool) {
    let name = dest.file_name().unwrap().to_str().unwrap();
    let tmp = dest
        .parent()
        .unwrap()
        .join(format!(".{name}.tmp-4294967295"));
    if is_dir {
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("config.json"), "{\"model_type\": ").unwrap();
    } else {
        std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        std::fs::write(tmp, "{\"schema_version\": ").unwrap();
    }
}

/// The command `make()` killed at `n` seeded moments, each followed by the invariants and, via
/// `recover`, a rerun; returns how many kills landed before the run ended.
fn kill_at_moments(
    seed: u64,
    n: usize,
    wall: Duration,
    make: &dyn Fn() -> Command,
    out: &Path,
    reference: &BTreeMap<PathBuf, Vec<u8>>,
    recover: &dyn Fn(bool),
) -> usize {
    let mut landed = 0;
    for f in moments(seed, n) {
        let killed = run_killed(make(), wall.mul_f64(f));
        landed += killed as usize;
        check_after_kill(out, reference);
        recover(killed);
    }
    landed
}

#[test]
fn convert_killed_leaves_a_complete_directory_or_none() {
    // The real SmolLM2 where ../shared has it (seconds of writing, so kills land mid-write),
    // else the tiny fixture.
    let smol = crate::common::shared().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gguf = if smol.is_file() {
        smol
    } else {
        fixture("gguf/tiny_llama_sp.gguf")
    };
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("hf");
    let make = || {
        let mut c = bin();
        c.args(["convert", "--dtype", "bf16", "--model"])
            .arg(&gguf)
            .arg("--out")
            .arg(&out);
        c
    };
    let wall = run_ok(make());
    let keep = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let reference = snapshot(&out, &keep);
    assert_eq!(reference.len(), 4);
    std::fs::remove_dir_all(&out).unwrap();
    let landed = kill_at_moments(11, 8, wall, &make, &out, &reference, &|_| {
        // convert never overwrites: a complete directory stays, an absent one is redone.
        if !out.exists() {
            plant_dead_temporary(&out, true);
            run_ok(make());
        }
        check_rerun(&out, &keep, &reference, "convert");
        std::fs::remove_dir_all(&out).unwrap();
    });
    assert!(landed > 0, "no kill landed before convert finished");
}

/// Training records for the tiny Llama (its vocabulary is small; any text tokenises).
fn records(dir: &Path) -> PathBuf {
    let recs: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({"instruction": format!("Tell me fact number {i}."), "input": "",
                               "output": format!("Fact {i}: the sky was blue on day {}.", i * 7)})
        })
        .collect();
    let p = dir.join("records.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

/// The step and loss of every line of `train_log.jsonl` (its seconds differ run to run).
fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["step"], v["loss"], v["holdout_loss"])
        })
        .collect()
}

#[test]
fn finetune_killed_mid_checkpoint_resumes_to_the_same_model() {
    let d = tempfile::tempdir().unwrap();
    let data = records(d.path());
    let out = d.path().join("ft");
    let make = |resume: bool| {
        let mut c = bin();
        c.args(["finetune", "--model"])
            .arg(fixture("llama"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args([
                "--epochs",
                "2",
                "--batch-size",
                "2",
                "--max-len",
                "32",
                "--holdout",
                "2",
            ])
            .args(["--warmup-steps", "2", "--lr", "1e-3", "--save-every", "1"]);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let wall = run_ok(make(false));
    let keep = ["config.json", "model.safetensors"];
    let reference = snapshot(&out, &keep);
    let ref_losses = losses(&out);
    let ref_summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("finetune.json")).unwrap()).unwrap();
    // A finished run killed while removing its checkpoints: --resume finishes the removal, of a
    // half-deleted checkpoints/ and of the temporary it is renamed to first.
    plant_dead_temporary(&out.join("checkpoints"), true);
    std::fs::create_dir_all(out.join("checkpoints/step-00000001")).unwrap();
    run_ok(make(true));
    check_rerun(
        &out,
        &keep,
        &reference,
        "finetune --resume of a finished run",
    );
    assert!(!out.join("checkpoints").exists());
    let mut plain = make(true);
    let r = plain.output().unwrap();
    assert!(
        !r.status.success() && String::from_utf8_lossy(&r.stderr).contains("nothing to resume"),
        "a finished run without leftovers has nothing to resume"
    );
    std::fs::remove_dir_all(&out).unwrap();
    let landed = kill_at_moments(12, 6, wall, &|| make(false), &out, &reference, &|killed| {
        let leftovers = std::fs::read_dir(&out).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".checkpoints.tmp-")
            })
        });
        let finished =
            out.join("config.json").exists() && !out.join("checkpoints").exists() && !leftovers;
        if killed && !finished {
            plant_dead_temporary(&out.join(".model"), true);
            run_ok(make(true));
        }
        check_rerun(&out, &keep, &reference, "finetune");
        assert_eq!(losses(&out), ref_losses);
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("finetune.json")).unwrap())
                .unwrap();
        for k in ["steps", "tokens", "final_loss", "holdout_losses"] {
            assert_eq!(s[k], ref_summary[k], "finetune.json's {k} after the resume");
        }
        std::fs::remove_dir_all(&out).unwrap();
    });
    assert!(landed > 0, "no kill landed before finetune finished");
}

fn align_cmd(out: &Path) -> Command {
    let mut c = bin_with_catalog();
    c.args(["align", "--model"])
        .arg(fixture("llama"))
        .arg("--out")
        .arg(out)
        .args([
            "--harmful-n",
            "8",
            "--benign-n",
            "8",
            "--answer-tokens",
            "8",
        ])
        .args(["--epochs", "1", "--lr", "2e-4", "--seed", "0"]);
    c
}

#[test]
fn align_killed_leaves_a_complete_model_or_none() {
    if skip_without_shared(&["data/advbench", "data/paper", "data/xstest"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("aligned");
    let wall = run_ok(align_cmd(&out));
    let keep = [
        "config.json",
        "model.safetensors",
        "align_data.jsonl",
        "train_log.jsonl",
    ];
    let mut reference = snapshot(&out, &keep);
    // train_log.jsonl records seconds; only its presence is compared.
    reference.remove(Path::new("train_log.jsonl"));
    let keep = &keep[..3];
    std::fs::remove_dir_all(&out).unwrap();
    let landed = kill_at_moments(13, 5, wall, &|| align_cmd(&out), &out, &reference, &|_| {
        // align stages its whole directory: none at all, or the complete one.
        if out.exists() {
            assert!(
                out.join("align.json").is_file(),
                "an align directory without align.json"
            );
        } else {
            plant_dead_temporary(&out, true);
            run_ok(align_cmd(&out));
        }
        check_rerun(&out, keep, &reference, "align");
        std::fs::remove_dir_all(&out).unwrap();
    });
    assert!(landed > 0, "no kill landed before align finished");
}

#[test]
fn demo_killed_again_and_again_resumes_to_the_same_results() {
    if skip_without_shared(&["data/advbench", "data/paper", "data/xstest"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo");
    let make = || {
        let mut c = bin_with_catalog();
        c.args(["demo", "--profile", "smoke", "--model"])
            .arg(fixture("llama"))
            .arg("--out")
            .arg(&out);
        c
    };
    let wall = run_ok(make());
    let keep = [
        "config.json",
        "model.safetensors",
        "align_data.jsonl",
        "eval.json",
    ];
    let reference = snapshot(&out, &keep);
    assert!(reference.contains_key(Path::new("eval/eval.json")));
    std::fs::remove_dir_all(&out).unwrap();
    plant_dead_temporary(&out.join("aligned"), true);
    // Each kill interrupts the previous killed run's resumption: stages done so far are cached
    // only where their marker says they completed.
    let landed = kill_at_moments(14, 6, wall, &make, &out, &reference, &|_| {
        for marker in walk(&out)
            .into_iter()
            .filter(|p| p.ends_with(".stage.json"))
        {
            let dir = marker.parent().unwrap();
            assert!(
                walk(dir).iter().all(|p| !is_temporary(p)),
                "{}",
                dir.display()
            );
        }
    });
    assert!(landed > 0, "no kill landed before demo finished");
    run_ok(make());
    check_rerun(&out, &keep, &reference, "demo");
}

#[test]
fn eval_killed_while_rewriting_leaves_the_old_report_or_none() {
    if skip_without_shared(&["data/advbench", "data/paper", "data/xstest"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("eval");
    let make = || {
        let mut c = bin_with_catalog();
        c.args(["eval", "--model"])
            .arg(format!("tiny={}", fixture("llama").display()))
            .args(["--limit", "6", "--max-new-tokens", "8", "--utility-n", "2"])
            .args(["--utility-max-new-tokens", "8", "--out"])
            .arg(&out);
        c
    };
    let wall = run_ok(make());
    let keep = ["eval.json", "eval.csv", "harmful.jsonl", "utility.jsonl"];
    let reference = snapshot(&out, &keep);
    assert_eq!(reference.len(), 4);
    let landed = kill_at_moments(15, 6, wall, &make, &out, &reference, &|_| {
        // A surviving eval.json is the complete report of the same command.
        if let Ok(doc) = std::fs::read(out.join("eval.json")) {
            assert!(
                doc == reference[Path::new("eval.json")],
                "eval.json is not the whole report"
            );
        }
        plant_dead_temporary(&out.join("eval.json"), false);
        run_ok(make());
        check_rerun(&out, &keep, &reference, "eval");
    });
    assert!(landed > 0, "no kill landed before eval finished");
}
