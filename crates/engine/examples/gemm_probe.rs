//! Measures candle matmul throughput for the shapes a decoder uses (x @ W^T in two layouts).
use candle_core::{Device, Tensor};
use std::time::Instant;

fn time<F: FnMut()>(mut f: F, reps: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for &(m, k, n) in &[
        (32usize, 576usize, 1536usize),
        (32, 576, 49152),
        (512, 576, 1536),
        (512, 576, 3072),
        (16, 576, 960),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &d)?;
        let wt = w.t()?.contiguous()?; // [k, n]
        let flops = 2.0 * (m * k * n) as f64;
        let a = time(
            || {
                let _ = x.matmul(&w.t().unwrap()).unwrap();
            },
            20,
        );
        let b = time(
            || {
                let _ = x.matmul(&wt).unwrap();
            },
            20,
        );
        let c = time(
            || {
                let _ = w.matmul(&x.t().unwrap()).unwrap();
            },
            20,
        );
        println!(
            "m={m} k={k} n={n}: x@W^T(view) {:.1} GF/s | x@Wt(contig) {:.1} GF/s | W@x^T \
            {:.1} GF/s",
            flops / a / 1e9,
            flops / b / 1e9,
            flops / c / 1e9
        );
    }
    Ok(())
}
