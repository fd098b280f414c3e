//! The demo's smoke profile end to end on the real SmolLM2 model: every stage runs, a rerun
//! finds every stage cached, and report.html renders in headless Chromium with every figure
//! non-empty and no console error (the browser part is skipped, with a message, where no
//! Chromium is installed, unless SAFETY_LAYERS_REQUIRE_BROWSER=1 as in CI).

use crate::common::{bin_with_catalog as bin, skip_without_shared};
use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|n| {
            let out = Command::new("which").arg(n).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

fn browser(exe: &Path, extra: &[String], page: &Path) -> std::process::Output {
    Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .args([
            "--disable-default-apps",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap()
}

#[test]
fn smoke_profile_runs_caches_and_renders() {
    if skip_without_shared(&["data", "models/SmolLM2-135M-Instruct.Q4_1.gguf"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo");
    let r = bin()
        .args(["demo", "--profile", "smoke", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let claims = results["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 3, "one verdict per finding: {claims:?}");
    for c in claims {
        assert!(
            !c["verdict"].as_str().unwrap().is_empty()
                && !c["evidence"].as_str().unwrap().is_empty()
        );
    }
    let models = results["eval"]["models"].as_array().unwrap();
    assert_eq!(models.len(), 5, "base, aligned, full, SPPFT, control");
    assert!(models.iter().all(|m| m["status"] == "ok"), "{models:?}");
    assert_eq!(
        results["finetune"]["ft-di-sppft"]["frozen_tensors_identical"],
        true
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Verdict") && html.matches("<figure>").count() == 5);
    // Self-contained: nothing is loaded from anywhere (SVG's xmlns names a namespace, not a fetch).
    for fetch in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "href='http",
        "url(http",
        "@import",
    ] {
        assert!(
            !html.contains(fetch),
            "the report must not reach the network ({fetch})"
        );
    }

    // A rerun resumes: every stage is found cached.
    let r = bin()
        .args(["demo", "--profile", "smoke", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    for stage in [
        "align",
        "cosine",
        "locate",
        "ft-di-full",
        "ft-di-sppft",
        "ft-di-control",
        "eval",
    ] {
        assert!(
            err.contains(&format!("demo: {stage}: cached")),
            "{stage} was recomputed:\n{err}"
        );
    }

    // --report-only runs nothing and rewrites the same results, naming the build that rebuilt
    // them; on a directory without a finished demo it fails, naming what is missing.
    let before: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let r = bin()
        .args(["demo", "--report-only", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(!err.contains("demo: align"), "a stage ran: {err}");
    let rebuilt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let by = rebuilt["provenance"]["report_rebuilt_by"].as_str().unwrap();
    assert!(by.starts_with("safety-layers "), "{by}");
    let mut again = rebuilt.clone();
    again["provenance"]
        .as_object_mut()
        .unwrap()
        .remove("report_rebuilt_by");
    assert_eq!(again, before, "--report-only changed the results");
    assert!(std::fs::read_to_string(out.join("report.html"))
        .unwrap()
        .contains("report rebuilt by"));
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = bin()
        .args(["demo", "--report-only", "--out"])
        .arg(&empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("results.json"), "{err}");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "wrote into {empty:?}"
    );

    let Some(exe) = chromium() else {
        assert!(
            std::env::var("SAFETY_LAYERS_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "Chromium is required here but not installed"
        );
        eprintln!("skipping the browser check: no chromium installed");
        return;
    };
    let page = out.join("report.html");
    let png = d.path().join("report.png");
    let wide = "--window-size=1200,6000".to_string();
    let shot = browser(
        &exe,
        &[wide.clone(), format!("--screenshot={}", png.display())],
        &page,
    );
    assert!(
        png.is_file() && std::fs::metadata(&png).unwrap().len() > 10_000,
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    // Every figure renders, and no text runs past a figure's edge, on a wide and a narrow page.
    let mut dom = None;
    for size in [wide, "--window-size=760,6000".to_string()] {
        let out = browser(&exe, &[size.clone(), "--dump-dom".to_string()], &page);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("data-figure-check=\"ok 5\""),
            "{size}: figures not all rendered or text past an edge: {}",
            text.lines().find(|l| l.contains("<body")).unwrap_or("")
        );
        dom.get_or_insert(out);
    }
    let dom = dom.expect("checked at two widths");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&dom.stderr),
        String::from_utf8_lossy(&shot.stderr)
    );
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
}
