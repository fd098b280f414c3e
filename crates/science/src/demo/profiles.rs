//! The demo's profiles: how large each stage's sets are and how long it trains.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Set sizes and settings of a profile. `None` = the whole set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub align_harmful: usize,
    pub align_benign: usize,
    pub align_answer_tokens: usize,
    pub align_epochs: usize,
    pub align_lr: f64,
    pub cosine_pairs: String,
    #[serde(deserialize_with = "crate::schema::required")]
    pub locate_queries: Option<usize>,
    pub locate_alpha: String,
    pub locate_tokens: usize,
    pub ft_sets: Vec<String>,
    #[serde(deserialize_with = "crate::schema::required")]
    pub ft_records: Option<usize>,
    pub ft_epochs: usize,
    pub ft_lr: f64,
    pub ft_warmup: usize,
    pub ft_batch: usize,
    pub ft_accum: usize,
    pub ft_max_len: usize,
    #[serde(deserialize_with = "crate::schema::required")]
    pub eval_limit: Option<usize>,
    pub eval_tokens: usize,
    pub utility_n: usize,
    pub utility_tokens: usize,
    /// Seeds per fine-tuning arm (seed, seed+1, ...); absent in results written before seeds.
    #[serde(default = "one")]
    pub ft_seeds: usize,
    /// Also the paper's Table-8 controls: every layer below the located range frozen, and every
    /// layer above it.
    #[serde(default)]
    pub ft_table8: bool,
}

fn one() -> usize {
    1
}

pub fn profile(name: &str) -> Result<Profile> {
    Ok(match name {
        "smoke" => Profile {
            name: "smoke".into(),
            align_harmful: 16,
            align_benign: 16,
            align_answer_tokens: 12,
            align_epochs: 1,
            align_lr: 2e-4,
            cosine_pairs: "100".into(),
            locate_queries: Some(12),
            locate_alpha: "1.2".into(),
            locate_tokens: 6,
            ft_sets: vec!["finetune-implicit".into()],
            ft_records: Some(12),
            ft_epochs: 1,
            ft_lr: 1e-4,
            ft_warmup: 1,
            ft_batch: 4,
            ft_accum: 1,
            ft_max_len: 80,
            eval_limit: Some(8),
            eval_tokens: 12,
            utility_n: 4,
            utility_tokens: 16,
            ft_seeds: 1,
            ft_table8: false,
        },
        "quick" => Profile {
            name: "quick".into(),
            align_harmful: 64,
            align_benign: 128,
            align_answer_tokens: 32,
            align_epochs: 2,
            align_lr: 2e-4,
            cosine_pairs: "all".into(),
            locate_queries: Some(128),
            locate_alpha: "auto".into(),
            locate_tokens: 10,
            ft_sets: vec!["finetune-implicit".into()],
            ft_records: Some(64),
            ft_epochs: 1,
            ft_lr: 1e-4,
            ft_warmup: 2,
            ft_batch: 8,
            ft_accum: 1,
            ft_max_len: 128,
            eval_limit: Some(64),
            eval_tokens: 16,
            utility_n: 32,
            utility_tokens: 48,
            ft_seeds: 1,
            ft_table8: false,
        },
        // Between quick and paper: the full evaluation sets and D_o, every arm (the Table-8
        // controls included) with three seeds, so the paired tests have the power quick lacks.
        // 4976 s of stages measured on 2 cores (2026-12-02, Intel Xeon, build of d2c6a25: align
        // 12 min, locate 7 min, 15 fine-tunes ~70 s each, 17 evaluations ~2.7 min each); 3.9 h
        // on the same machine with the build of 2026-12-01. A rerun resumes from its stages.
        "full" => Profile {
            name: "full".into(),
            align_harmful: 256,
            align_benign: 512,
            align_answer_tokens: 32,
            align_epochs: 2,
            align_lr: 2e-4,
            cosine_pairs: "all".into(),
            locate_queries: None,
            locate_alpha: "auto".into(),
            locate_tokens: 16,
            ft_sets: vec!["finetune-implicit".into()],
            ft_records: Some(128),
            ft_epochs: 1,
            ft_lr: 1e-4,
            ft_warmup: 2,
            ft_batch: 8,
            ft_accum: 1,
            ft_max_len: 128,
            eval_limit: None,
            eval_tokens: 24,
            utility_n: 64,
            utility_tokens: 48,
            ft_seeds: 3,
            ft_table8: true,
        },
        "paper" => Profile {
            name: "paper".into(),
            align_harmful: 800,
            align_benign: 800,
            align_answer_tokens: 96,
            align_epochs: 3,
            align_lr: 1e-4,
            cosine_pairs: "500".into(),
            locate_queries: None,
            locate_alpha: "auto".into(),
            locate_tokens: 16,
            ft_sets: vec!["finetune-normal".into(), "finetune-implicit".into()],
            ft_records: None,
            ft_epochs: 3,
            ft_lr: 1e-4,
            ft_warmup: 100,
            ft_batch: 4,
            ft_accum: 32,
            ft_max_len: 256,
            eval_limit: None,
            eval_tokens: 64,
            utility_n: 500,
            utility_tokens: 128,
            ft_seeds: 3,
            ft_table8: true,
        },
        _ => bail!("unknown --profile `{name}` (expected smoke, quick, full or paper)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_exist_and_unknown_is_an_error() {
        for n in ["smoke", "quick", "full", "paper"] {
            assert_eq!(profile(n).unwrap().name, n);
        }
        assert!(profile("fast").is_err());
    }
}
