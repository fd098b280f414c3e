//! CPU kernels the decoder calls where candle's general ops are slow for our shapes or hold
//! too much memory: the decode-step matmul (few rows, each weight row streamed once), matmuls on
//! bf16/f16 weights widened a tile at a time, bf16 products (AMX tiles or `vdpbf16ps`) where bf16
//! compute is asked for, matmuls on quantized weights, and inference
//! attention. Each has a scalar reference path and SIMD paths chosen at run time (`simd`).
//! `device_ops` holds the decoder's paths off the CPU (candle's ops: CUDA kernels and cuBLAS).

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
pub(crate) mod attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod attention_rows;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bcast;
pub(crate) mod bf16_rows;
pub(crate) mod dequant;
pub mod device_ops;
#[cfg(target_arch = "x86_64")]
pub(crate) mod dpbf16;
pub(crate) mod gemm;
pub mod matmul_small;
pub mod mem;
#[cfg(target_arch = "x86_64")]
pub(crate) mod pack;
pub mod quant;
pub mod simd;
pub mod widen;

/// A pointer that rayon tasks may share because each writes a disjoint part of its target
/// (every use says which part, at its call site).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: used only where the tasks' writes are disjoint (see the call sites).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f` on one of rayon's worker threads (at once when already on one). A decode step's
/// kernels each split their work across the pool (about 150 splits per step of a 30-layer
/// model); from a thread outside the pool every split is an injection the caller then sleeps on
/// and is woken from, where from a worker it is a push onto its own queue (measured on the
/// 2-core Zen 4 guest: generation 170-178 -> 188-194 tokens/s, same tokens).
///
/// The pool's other workers are kept busy-waiting for work while `f` runs: between two
/// kernels an idle worker goes to sleep within microseconds, and waking it again (a futex call
/// and, in a VM, an interrupt to another virtual CPU) was ~7% of a generation profile on the
/// 2-core Xeon guest. Each keeper takes whatever work is pending (`rayon::yield_now`) until `f`
/// ends; one that lands on `f`'s own thread returns at once, since it would otherwise wait there
/// on the very work it blocks.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = AtomicBool::new(false);
    let done = &done;
    rayon::scope(|s| {
        let home = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| {
                if rayon::current_thread_index() == home {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let _done = Done(done);
        f()
    })
}

/// f32 weight rows served as if widened from a narrower storage (a copy), for tests that a
/// widening path gives the f32 path's bits.
#[cfg(test)]
pub(crate) struct CopiedRows<'a>(pub &'a [f32], pub usize);

#[cfg(test)]
impl matmul_small::WeightRows for CopiedRows<'_> {
    const WIDENS: bool = true;
    fn widen(&self, j: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.0[j * self.1..(j + 1) * self.1]);
    }
}

/// Deterministic values in [-0.5, 0.5) for the kernels' tests (an LCG: no rand dependency).
#[cfg(test)]
pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// The training products the kernels' timing tests measure: SmolLM2-135M's linears as
/// `(in, out)` (qkv, o, gate/up, down, the head) at `TRAINING_ROWS` rows (a batch of 4 x 128
/// tokens, packed).
#[cfg(test)]
pub(crate) const TRAINING_SHAPES: [(usize, usize); 5] = [
    (576, 960),
    (576, 576),
    (576, 3072),
    (1536, 576),
    (576, 49152),
];
#[cfg(test)]
pub(crate) const TRAINING_ROWS: usize = 433;

/// GFLOP/s of `f` doing `flops` per call: one warm-up call, then five timed (the kernels'
/// ignored timing tests).
#[cfg(test)]
pub(crate) fn gflops(flops: f64, f: &mut dyn FnMut()) -> f64 {
    f();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        f();
    }
    flops * 5.0 / t.elapsed().as_secs_f64() / 1e9
}
