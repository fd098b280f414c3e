//! Paths and helpers the catalog's integration tests share.

#[path = "../../../../tests/support/common.rs"]
mod support;
pub use support::*;

use std::path::PathBuf;
use std::process::Command;

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
