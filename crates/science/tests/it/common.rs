//! Paths and helpers the science crate's integration tests share.

#[path = "../../../../tests/support/common.rs"]
mod support;
pub use support::*;
