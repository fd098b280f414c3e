//! The cli crate's integration tests, one binary (one link, one run); shared paths and
//! helpers are in common.rs.

mod cli;
mod common;
mod demo_arms;
mod demo_smoke;
mod eval_smollm2;
mod export_cli;
mod finetune_cli;
mod kill;
mod locate_consistency;
mod logits_cli;
