//! The catalog crate's integration tests, one binary (one link, one run); shared paths and
//! helpers are in common.rs.

mod catalog;
mod common;
mod from_env;
mod prompt_texts;
mod suggest;
