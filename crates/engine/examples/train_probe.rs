//! Times one training step's phases (forward, backward, optimizer) on a real checkpoint:
//! `cargo run --release --example train_probe -- MODEL [BATCH] [LEN] [FREEZE_FIRST FREEZE_LAST]`.

use anyhow::Result;
use std::time::Instant;

mod common;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let b: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let t: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let freeze: Option<(usize, usize)> = match (args.get(4), args.get(5)) {
        (Some(a), Some(z)) => Some((a.parse()?, z.parse()?)),
        _ => None,
    };
    let (mut tr, cfg) = common::trainer(path, freeze)?;
    let batch = common::synthetic_batch(&cfg, b, t)?;
    // `loss` prepares no gradients, so backward is timed as `accumulate` (forward and backward)
    // less a forward alone.
    for rep in 0..3 {
        let t0 = Instant::now();
        let _ = tr.loss(&batch)?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        tr.accumulate(&batch, 1.0 / batch.num_targets as f64)?;
        let t2 = Instant::now();
        tr.apply(1e-5, Some(1.0))?;
        let t3 = Instant::now();
        let (fwd, step) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        println!(
            "rep {rep}: forward {fwd:.2}s, backward ~{:.2}s (forward + backward {step:.2}s), \
             optimizer {:.2}s; {:.1} tok/s for forward + backward",
            step - fwd,
            (t3 - t2).as_secs_f64(),
            (b * t) as f64 / step
        );
    }
    Ok(())
}
