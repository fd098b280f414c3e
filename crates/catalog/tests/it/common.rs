//! Paths and helpers the catalog's integration tests share.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `../shared` beside the workspace: datasets, the SmolLM2 GGUF.
pub fn shared() -> PathBuf {
    root().join("../shared")
}

/// The shared datasets, laid out as the catalog's data dir.
pub fn shared_data() -> PathBuf {
    shared().join("data")
}

/// For a test that changes process-wide state (environment variables, PATH): outside, runs
/// that one test alone in a child process of this binary, asserts it passed and returns false;
/// inside that child, returns true and the test runs. Other tests never see the change.
pub fn in_own_process() -> bool {
    const CHILD: &str = "SAFETY_LAYERS_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let test = std::thread::current().name().unwrap().to_string();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "1 passed": the filter found the test, so a rename cannot turn this into a no-op.
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} in its own process:\n{text}"
    );
    false
}

/// True (after one `skipped:` line) when `../shared` lacks one of `parts`, so the test returns;
/// a failure instead under SAFETY_LAYERS_REQUIRE_SHARED=1, as in CI.
pub fn skip_without_shared(parts: &[&str]) -> bool {
    match parts.iter().find(|p| !shared().join(p).exists()) {
        Some(p) => skip(
            "SAFETY_LAYERS_REQUIRE_SHARED",
            &format!("needs ../shared/{p}"),
        ),
        None => false,
    }
}

/// One `skipped: <test>: <why>` line, or a panic where `require` is set to 1.
fn skip(require: &str, why: &str) -> bool {
    // libtest names each test's thread after the test.
    let test = std::thread::current().name().unwrap_or("test").to_string();
    if std::env::var(require).as_deref() == Ok("1") {
        panic!("{test}: {why} ({require}=1)");
    }
    // Written to stderr directly, past the harness's output capture, so a skip is never silent.
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
    true
}
