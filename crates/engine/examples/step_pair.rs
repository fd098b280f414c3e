//! SPPFT's step saving, measured paired: a full and a frozen trainer on the same batch in one
//! process, their optimizer steps alternating (ABBA), so drift in the machine's speed falls on
//! both alike. Prints each arm's median step, the per-pair saving's median with a 95% interval
//! (order statistics of the pairs, as for a median), and the share of the step's matmul FLOPs
//! the freeze removes (its layers' weight gradients):
//! `cargo run --release -p sl-engine --example step_pair -- MODEL FIRST LAST [PAIRS] [BATCH] [LEN]`
//! (MODEL a directory or file `Model::load` reads; f32 or bf16 weights).

use anyhow::{bail, Result};
use sl_engine::train::trainer::Trainer;
use std::time::Instant;

mod common;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: step_pair MODEL FIRST LAST [PAIRS] [BATCH] [LEN]");
    }
    let path = std::path::Path::new(&args[1]);
    let (first, last): (usize, usize) = (args[2].parse()?, args[3].parse()?);
    let arg = |i: usize, d: usize| -> Result<usize> {
        Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let (pairs, b, t) = (arg(4, 24)?, arg(5, 4)?, arg(6, 128)?);
    let (mut full, cfg) = common::trainer(path, None)?;
    let (mut frozen, _) = common::trainer(path, Some((first, last)))?;
    if last >= cfg.num_layers || first > last {
        bail!("layers {first}-{last}: the model has {}", cfg.num_layers);
    }
    let batch = common::synthetic_batch(&cfg, b, t)?;
    let step = |tr: &mut Trainer| -> Result<f64> {
        let t0 = Instant::now();
        sl_engine::kernels::on_workers(|| -> Result<()> {
            tr.accumulate(&batch, 1.0 / batch.num_targets as f64)?;
            tr.apply(1e-6, Some(1.0))?;
            Ok(())
        })?;
        Ok(t0.elapsed().as_secs_f64())
    };
    // Warm-up: the first steps allocate the moments and fault in every buffer.
    for _ in 0..2 {
        step(&mut full)?;
        step(&mut frozen)?;
    }
    let (mut tf, mut tz, mut saving) = (vec![], vec![], vec![]);
    for p in 0..pairs {
        let (a, z) = if p % 2 == 0 {
            let a = step(&mut full)?;
            (a, step(&mut frozen)?)
        } else {
            let z = step(&mut frozen)?;
            (step(&mut full)?, z)
        };
        tf.push(a);
        tz.push(z);
        saving.push(1.0 - z / a);
    }
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    // Parameter matmuls per token: forward 2P, backward 2P (inputs) + 2P (weights), per layer
    // and for the head (tied or not, its weight trains).
    let layer = (h * (q + 2 * kv) + q * h + 3 * h * i) as f64;
    let head = (h * cfg.vocab_size) as f64;
    let total = 6.0 * (layer * cfg.num_layers as f64 + head);
    let share = 2.0 * layer * (last - first + 1) as f64 / total;
    let (lo, mid, hi) = median_interval(&mut saving);
    println!(
        "{pairs} pairs, batch {b} x {t}: full step {:.3} s, layers {first}-{last} frozen {:.3} s \
         (medians); saving {:.1}% of the step ({} {:.1} to {:.1}%), frozen matmul share \
         {:.1}%: {:.2}x of it ({:.2} to {:.2})",
        median(&mut tf),
        median(&mut tz),
        100.0 * mid,
        if pairs < 6 { "range" } else { "95% interval" },
        100.0 * lo,
        100.0 * hi,
        100.0 * share,
        mid / share,
        lo / share,
        hi / share
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    median_interval(v).1
}

/// The median and a distribution-free 95% interval for it: order statistics k and n + 1 - k,
/// k the largest with P(Binomial(n, 1/2) < k) <= 2.5% (the whole range below 6 values).
fn median_interval(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let mid = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let (mut k, mut cdf, mut pmf) = (0usize, 0.0f64, 0.5f64.powi(n as i32));
    while k < n && cdf + pmf <= 0.025 {
        cdf += pmf;
        pmf *= (n - k) as f64 / (k + 1) as f64;
        k += 1;
    }
    let k = k.max(1);
    (v[k - 1], mid, v[n - k])
}
