//! The science crate's integration tests, one binary (one link, one run); shared paths and
//! helpers are in common.rs.

mod common;
mod cosine_smollm2;
mod eval_teacher_forced;
mod finetune_torch;
mod judges_labelled;
mod judges_organisms;
mod locate_fixture;
mod rouge_fixture;
