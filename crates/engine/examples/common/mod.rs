//! What the training probes share: a trainer with an optional frozen layer range (SPPFT's
//! freeze: those layers' attention and MLP weights) and a fixed synthetic batch.

use anyhow::Result;
use sl_engine::model::params::Module;
use sl_engine::train::adamw::AdamWConfig;
use sl_engine::train::trainer::{Batch, Trainer};
use sl_engine::{Model, ModelConfig};

/// The model at `path` in a trainer, layers `freeze` (first, last) frozen.
pub fn trainer(
    path: &std::path::Path,
    freeze: Option<(usize, usize)>,
) -> Result<(Trainer, ModelConfig)> {
    let model = Model::load(path)?;
    let cfg = model.cfg().clone();
    let tr = Trainer::new(
        model.decoder,
        |i| {
            freeze.is_some_and(|(a, z)| {
                i.layer.is_some_and(|l| l >= a && l <= z)
                    && matches!(i.module, Module::Attn | Module::Mlp)
            })
        },
        AdamWConfig::default(),
        false,
    )?;
    Ok((tr, cfg))
}

/// `b` rows of `t` pseudo-random tokens, every position after the first supervised.
pub fn synthetic_batch(cfg: &ModelConfig, b: usize, t: usize) -> Result<Batch> {
    let vocab = cfg.vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..t)
                .map(|i| ((i * 7919 + r * 104729) as u32) % vocab)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    Batch::new(&refs, &vec![1; b], &candle_core::Device::Cpu)
}
