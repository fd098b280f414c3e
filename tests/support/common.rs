//! Paths and skip rules every crate's integration tests share, included by each crate's
//! `tests/it/common.rs` (`#[path]`): each crate's tests compile on their own, so this file is
//! compiled into each of them rather than put in a crate of its own.

// Each crate's tests use a subset of these.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root: tests/fixtures, tools/. Every crate sits at crates/<name>.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `../shared` beside the workspace: datasets, the SmolLM2 GGUF, real tokenizers.
pub fn shared() -> PathBuf {
    root().join("../shared")
}

/// A checked-in fixture: tests/fixtures/<name>.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// True (after one `skipped:` line) when python3 cannot import torch, transformers, yaml,
/// accelerate and peft, so
/// the test returns; a failure instead under SAFETY_LAYERS_REQUIRE_PEERS=1, as in CI.
pub fn skip_without_python_peers() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import torch, transformers, yaml, accelerate, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    !ok && skip(
        "SAFETY_LAYERS_REQUIRE_PEERS",
        "needs python3 with torch, transformers, pyyaml, accelerate, peft",
    )
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
