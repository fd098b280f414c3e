//! Times one training step's phases (forward, backward, optimizer) on a real checkpoint:
//! `cargo run --release --example train_probe -- MODEL [BATCH] [LEN] [FREEZE_FIRST FREEZE_LAST]`.

use anyhow::Result;
use sl_engine::model::params::Module;
use sl_engine::train::adamw::AdamWConfig;
use sl_engine::train::trainer::{Batch, Trainer};
use sl_engine::Model;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(std::path::Path::new(&args[1]))?;
    let b: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let t: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let freeze: Option<(usize, usize)> = match (args.get(4), args.get(5)) {
        (Some(a), Some(z)) => Some((a.parse()?, z.parse()?)),
        _ => None,
    };
    let vocab = model.cfg().vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..t)
                .map(|i| ((i * 7919 + r * 104729) as u32) % vocab)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch = Batch::new(&refs, &vec![1; b], &candle_core::Device::Cpu)?;
    let mut tr = Trainer::new(
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
    for rep in 0..3 {
        let t0 = Instant::now();
        let loss = tr.loss(&batch)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        drop(grads);
        tr.accumulate(&batch, 1.0 / batch.num_targets as f64)?;
        let t3 = Instant::now();
        tr.apply(1e-5, Some(1.0))?;
        let t4 = Instant::now();
        println!(
            "rep {rep}: forward {:.2}s backward {:.2}s (accumulate {:.2}s) optimizer {:.2}s; \
                {:.1} tok/s for fwd+bwd",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64(),
            (b * t) as f64 / (t3 - t2).as_secs_f64()
        );
    }
    Ok(())
}
