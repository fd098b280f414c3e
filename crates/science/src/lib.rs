//! The paper's science on top of the engine, one folder per step:
//!
//! - [`cosine`]: existence of safety layers (§3.2-3.3): cosine analysis, the initial range read
//!   off the angle gap, figures.
//! - [`locate`]: precise localisation by weight scaling (§3.4-3.5, A.3.3-A.3.4).
//! - [`judges`]: the refusal judges localisation and evaluation share (keyword rules, probe).
//! - [`align`]: making an aligned model organism by safety SFT.
//! - [`finetune`]: SPPFT, full fine-tuning and control freezes (§4), with resumable checkpoints.
//! - [`eval`]: the paper's evaluation table (Table 2): harmful rate, over-rejection, utility.
//! - [`export`]: the freeze plan for other trainers (axolotl, PEFT, Hugging Face Trainer).
//! - [`inputs`]: models, prompt sets and training data by path or catalog name.
//! - [`report`]: the demo's results.json and report.html.
//! - [`demo`]: the demo's profiles, provenance and stage markers (the CLI runs the stages).
//! - [`schema`]: reading and writing the versioned result files (cosine.json, locate.json...).
//! - [`stats`], [`rng`]: intervals and a deterministic generator the steps share.

pub mod align;
pub mod cosine;
pub mod demo;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod inputs;
pub mod judges;
pub mod locate;
pub mod paired;
pub mod report;
pub mod rng;
pub mod schema;
pub mod stats;

/// sha256 of a byte string, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lower-case hex of a digest.
pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
