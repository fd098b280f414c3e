//! Paths and helpers the engine's integration tests share.

#[path = "../../../../tests/support/common.rs"]
mod support;
pub use support::*;

use std::path::Path;

/// A writable copy of a fixture directory, in a temp dir removed on drop.
pub fn copy_fixture(src: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}
