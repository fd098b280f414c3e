//! `finetune.json`: what a finished run did, as one typed record (read back by `read`).

use crate::finetune::FinetuneConfig;
use crate::schema::Precision;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bumped when a field is renamed or removed.
pub const SCHEMA_VERSION: u32 = 1;

/// The contents of `finetune.json`. Every field is required on read, the optional ones too (as
/// `null`), so a renamed field is reported rather than silently absent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneSummary {
    pub schema_version: u32,
    pub config: FinetuneConfig,
    pub examples: Examples,
    /// Optimizer steps taken (fewer than scheduled with `max_steps`).
    pub steps: usize,
    pub steps_per_epoch: usize,
    pub total_steps_scheduled: usize,
    pub tokens: usize,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    /// Loss of the last step; null when no step was taken.
    #[serde(deserialize_with = "Option::deserialize")]
    pub final_loss: Option<f64>,
    pub holdout_losses: Vec<HoldoutLoss>,
    pub trainable_parameters: usize,
    pub frozen_parameters: usize,
    pub frozen_tensors_identical: bool,
    /// Null where /proc/self/status is not readable.
    #[serde(deserialize_with = "Option::deserialize")]
    pub peak_rss_mb: Option<f64>,
    pub wall_seconds: f64,
    pub resumed: bool,
    pub output_dtype: String,
    /// How the model computed during training (absent in files written before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Examples {
    pub train: usize,
    pub holdout: usize,
    pub holdout_rule: String,
}

/// The held-out loss at the end of an epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HoldoutLoss {
    pub epoch: usize,
    pub step: usize,
    pub holdout_loss: f64,
}

/// Reads a `finetune.json`; a missing or renamed field is named with the file.
pub fn read(path: &Path) -> Result<FinetuneSummary> {
    crate::schema::read(path, SCHEMA_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> FinetuneSummary {
        FinetuneSummary {
            schema_version: SCHEMA_VERSION,
            config: FinetuneConfig {
                model: "m".into(),
                data: "d".into(),
                freeze: Some(sl_engine::LayerRange { first: 1, last: 2 }),
                freeze_modules: vec!["attn".into(), "mlp".into()],
                epochs: 1,
                lr: 1e-4,
                lr_schedule: crate::finetune::data::Schedule::Linear,
                warmup_steps: 0,
                batch_size: 2,
                grad_accum: 1,
                max_len: 64,
                weight_decay: 0.0,
                max_grad_norm: None,
                template: sl_engine::Template::Alpaca,
                train_on_inputs: true,
                holdout: 1,
                seed: 42,
                shuffle: true,
                grad_checkpointing: false,
                freeze_embeddings: false,
                train_layers: None,
                bf16_mixed: false,
                max_steps: None,
                dtype: "auto".into(),
            },
            examples: Examples {
                train: 3,
                holdout: 1,
                holdout_rule: "r".into(),
            },
            steps: 2,
            steps_per_epoch: 2,
            total_steps_scheduled: 2,
            tokens: 40,
            train_seconds: 0.5,
            tokens_per_second: 80.0,
            final_loss: None,
            holdout_losses: vec![HoldoutLoss {
                epoch: 1,
                step: 2,
                holdout_loss: 2.5,
            }],
            trainable_parameters: 10,
            frozen_parameters: 5,
            frozen_tensors_identical: true,
            peak_rss_mb: Some(12.0),
            wall_seconds: 1.0,
            resumed: false,
            output_dtype: "f32".into(),
            precision: Some(Precision {
                dtype_option: "native".into(),
                weights: "Q4_1+Q8_0".into(),
                activations: "f32".into(),
                device: Some("cpu".into()),
            }),
        }
    }

    #[test]
    fn what_is_written_reads_back_and_a_renamed_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("finetune.json");
        let text = serde_json::to_string_pretty(&summary()).unwrap();
        assert!(text.starts_with("{\n  \"schema_version\": 1,"), "{text}");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read(&path).unwrap(), summary());
        // A file written before precision was recorded still reads, without it.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("precision").unwrap();
        std::fs::write(&path, old.to_string()).unwrap();
        assert_eq!(read(&path).unwrap().precision, None);
        // A null optional field is fine, an absent one is not.
        std::fs::write(&path, text.replace("\"final_loss\"", "\"last_loss\"")).unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(
            e.contains("finetune.json") && e.contains("final_loss"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_field_is_named_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("finetune.json");
        std::fs::write(&path, r#"{"schema_version": 1}"#).unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(
            e.contains("finetune.json") && e.contains("missing field `config`"),
            "{e}"
        );
    }
}
