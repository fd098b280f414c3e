//! Paths and helpers the command line's integration tests share.

#[path = "../../../../tests/support/common.rs"]
mod support;
pub use support::*;

use std::path::Path;
use std::process::Command;

/// The `safety-layers` binary cargo built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_safety-layers"))
}

/// The binary with the catalog pointed at ../shared where the environment does not point it
/// elsewhere, so default dataset and model names resolve.
pub fn bin_with_catalog() -> Command {
    let mut c = bin();
    if std::env::var_os("SAFETY_LAYERS_DATA").is_none() {
        c.env("SAFETY_LAYERS_DATA", shared().join("data"));
    }
    if std::env::var_os("SAFETY_LAYERS_MODELS").is_none() {
        c.env("SAFETY_LAYERS_MODELS", shared().join("models"));
    }
    c
}

/// Copies the files of a directory (a fixture checkpoint) into `dst`, created if needed.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}
