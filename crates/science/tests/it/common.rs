//! Paths and helpers the science crate's integration tests share.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The workspace root: tests/fixtures, tools/.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `../shared` beside the workspace: datasets, the SmolLM2 GGUF.
pub fn shared() -> PathBuf {
    root().join("../shared")
}

/// A checked-in fixture: tests/fixtures/<name>.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
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
