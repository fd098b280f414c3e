//! The paper's science on top of the engine: the cosine analysis that shows safety layers exist
//! (§3.2-3.3), with figures; localisation, fine-tuning and evaluation follow the same pattern.

pub mod align;
pub mod cosine;
pub mod cosine_report;
pub mod eval;
pub mod eval_figure;
pub mod eval_report;
pub mod eval_utility;
pub mod export_formats;
pub mod export_plan;
pub mod figures;
pub mod finetune;
pub mod finetune_data;
pub mod judges;
pub mod locate;
pub mod locate_report;
pub mod probe;
pub mod range_rule;
pub mod report;
pub mod rng;
pub mod rouge;
pub mod stats;

/// sha256 of a byte string, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
