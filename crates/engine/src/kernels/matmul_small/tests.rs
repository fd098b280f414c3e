use super::*;
use crate::kernels::pseudo;
use candle_core::Device;

#[test]
fn equals_candle_matmul_on_every_tail() {
    for (m, n, k) in [
        (1, 5, 7),
        (2, 4, 8),
        (3, 9, 17),
        (16, 576, 576),
        (17, 61, 96),
        (32, 1000, 1536),
        (31, 3, 1001),
    ] {
        let x = Tensor::from_vec(pseudo(m * k, 1), (m, k), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(pseudo(n * k, 2), (n, k), &Device::Cpu).unwrap();
        // Past the level's `max_rows` the kernel still computes what it is given (the bf16
        // path hands it up to MAX_ROWS rows), but `matmul_wt` leaves the rows to gemm.
        let qualifies = m <= max_rows(crate::kernels::simd::level());
        let got = match matmul_wt(&x, &w).unwrap() {
            Some(y) => {
                assert!(qualifies, "{m} rows should go to gemm");
                y.to_vec2::<f32>().unwrap()
            }
            None => {
                assert!(!qualifies, "{m} rows should take the kernel");
                let y = small_rows(&pseudo(m * k, 1), &F32Rows(&pseudo(n * k, 2)), m, n, k);
                y.chunks(n).map(|r| r.to_vec()).collect()
            }
        };
        let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (gr, wr) in got.iter().zip(&want) {
            for (g, e) in gr.iter().zip(wr) {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt(),
                    "{m}x{n}x{k}: {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn declines_what_it_does_not_handle() {
    let w = Tensor::from_vec(pseudo(64, 3), (8, 8), &Device::Cpu).unwrap();
    let big = Tensor::from_vec(
        pseudo(8 * (MAX_ROWS + 1), 4),
        (MAX_ROWS + 1, 8),
        &Device::Cpu,
    )
    .unwrap();
    assert!(matmul_wt(&big, &w).unwrap().is_none(), "too many rows");
    let var = candle_core::Var::from_tensor(&w).unwrap();
    let x = Tensor::from_vec(pseudo(16, 5), (2, 8), &Device::Cpu).unwrap();
    assert!(
        matmul_wt(&x, var.as_tensor()).unwrap().is_none(),
        "a trainable weight needs candle's backward"
    );
    let strided = Tensor::from_vec(pseudo(16, 6), (8, 2), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(
        matmul_wt(&strided, &w).unwrap().is_none(),
        "non-contiguous input"
    );
}

/// The AVX-512 tile of four input rows gives each sum to the bit as the tile of two does
/// (same FMAs, same order, same reduction), so a batch's tokens do not depend on which tile
/// served them; a tail of every width.
#[cfg(target_arch = "x86_64")]
#[test]
fn four_row_tile_sums_as_pairs() {
    let levels = crate::kernels::simd::test_levels("matmul_small");
    if !levels.contains(&Level::Avx512) {
        return;
    }
    for k in [7, 16, 33, 576, 1001] {
        let (x, w) = (pseudo(4 * k, 9), pseudo(4 * k, 10));
        let xs: [&[f32]; 4] = std::array::from_fn(|a| &x[a * k..(a + 1) * k]);
        let ws: [&[f32]; 4] = std::array::from_fn(|c| &w[c * k..(c + 1) * k]);
        // SAFETY: test_levels lists Avx512 only where the CPU runs it.
        let (four, lo, hi) = unsafe {
            (
                tile_avx512(xs, ws, None),
                tile_avx512([xs[0], xs[1]], ws, None),
                tile_avx512([xs[2], xs[3]], ws, Some(ws)),
            )
        };
        let pairs = [lo[0], lo[1], hi[0], hi[1]];
        for (a, (f, p)) in four.iter().zip(&pairs).enumerate() {
            for c in 0..4 {
                assert_eq!(f[c].to_bits(), p[c].to_bits(), "k {k}, [{a}, {c}]");
            }
        }
    }
}

/// The transposing reduction adds in `_mm512_reduce_add_ps`'s order: values spanning 24
/// binary orders of magnitude, where any other order rounds differently.
#[test]
#[cfg(target_arch = "x86_64")]
fn sums16_adds_as_reduce_add() {
    use std::arch::x86_64::*;
    if !crate::kernels::simd::test_levels("matmul_small").contains(&Level::Avx512) {
        return;
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn both(vals: &[f32]) -> ([f32; 16], [f32; 16]) {
        let v: [__m512; 16] = std::array::from_fn(|n| _mm512_loadu_ps(vals[16 * n..].as_ptr()));
        let mut got = [0f32; 16];
        _mm512_storeu_ps(got.as_mut_ptr(), x86::sums16(v));
        (got, std::array::from_fn(|n| _mm512_reduce_add_ps(v[n])))
    }
    for seed in 0..200u64 {
        let vals: Vec<f32> = pseudo(256, 40 + seed)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (2f32).powi((i * 7 % 25) as i32 - 12))
            .collect();
        // SAFETY: test_levels lists Avx512 only where the CPU runs it.
        let (got, want) = unsafe { both(&vals) };
        for n in 0..16 {
            assert_eq!(got[n].to_bits(), want[n].to_bits(), "seed {seed}, lane {n}");
        }
    }
}

#[test]
fn every_level_matches_scalar() {
    for level in crate::kernels::simd::test_levels("matmul_small") {
        // 1-4 rows (and an odd 5), weight counts leaving partial quads, widths that are not
        // a multiple of 8 or 16, and a long K.
        for (m, n, k) in [
            (1, 5, 7),
            (2, 4, 16),
            (3, 9, 17),
            (4, 13, 33),
            (2, 8, 100),
            (5, 7, 255),
            (4, 6, 4099),
            (6, 8, 50),
            (7, 9, 40),
            (8, 12, 576),
        ] {
            let (x, w) = (pseudo(m * k, 7), pseudo(n * k, 8));
            let got = small_rows_at(level, &x, &F32Rows(&w), m, n, k);
            let want = small_rows_at(Level::Scalar, &x, &F32Rows(&w), m, n, k);
            for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                let (i, j) = (idx / n, idx % n);
                let abs: f32 = x[i * k..(i + 1) * k]
                    .iter()
                    .zip(&w[j * k..(j + 1) * k])
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                let tol = 4.0 * f32::EPSILON * (k as f32).sqrt() * abs;
                assert!(
                    (g - e).abs() <= tol,
                    "{level:?} {m}x{n}x{k} [{i},{j}]: {g} vs {e}"
                );
            }
        }
    }
}

/// GFLOP/s of the decode kernel at each level this CPU runs: one tile in L1; 4-32 rows
/// (K = 576) against a weight held in L2; and a decode step's projections of 8 SmolLM2
/// layers streamed from memory at 1, 16 and 32 rows (the generation and localisation
/// benchmarks' batches), best of 5. Prints, asserts nothing (a measurement, not a test):
/// `cargo test -p sl-engine --release --lib kernels::matmul_small::tests::timing --
/// --ignored --nocapture` (RAYON_NUM_THREADS=1 for one core's figures).
#[test]
#[ignore]
fn timing() {
    // One tile alone on L1-resident rows of 576: the kernel's own speed, against which the
    // whole-matrix figures show what memory and bookkeeping cost.
    let k = 576;
    let (x, w) = (pseudo(4 * k, 1), pseudo(4 * k, 2));
    for level in crate::kernels::simd::test_levels("matmul_small") {
        let (reps, nx) = (100_000, x_rows(level));
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let xs = input_rows(&x, k, 0, nx);
            let ws = [&w[..k], &w[k..2 * k], &w[2 * k..3 * k], &w[3 * k..]];
            std::hint::black_box(tile(level, std::hint::black_box(xs), nx, ws, 4, None));
        }
        let flop = 2.0 * (4 * nx * k * reps) as f64;
        println!(
            "{level:?} one {nx}x4 tile, L1, one thread: {:.1} GFLOP/s",
            flop / t.elapsed().as_secs_f64() / 1e9
        );
    }
    // Weights in L2 (N = 256: 590 KB), best of 5.
    for (m, n, reps) in [
        (4, 256, 8000),
        (8, 256, 4000),
        (16, 256, 2000),
        (32, 256, 1000),
    ] {
        let (x, w) = (pseudo(m * k, 1), pseudo(n * k, 2));
        for level in crate::kernels::simd::test_levels("matmul_small") {
            let flop = 2.0 * (m * n * k * reps) as f64 / 5.0;
            let g = crate::kernels::gflops(flop, &mut || {
                for _ in 0..reps / 5 {
                    std::hint::black_box(small_rows_at(level, &x, &F32Rows(&w), m, n, k));
                }
            });
            println!("{level:?} m={m} k={k} n={n}: {g:.1} GFLOP/s");
        }
    }
    // A decode step's projections of SmolLM2's 30 layers, streamed from memory (405 MB):
    // qkv, o, gate_up [N, 576] and down [576, 1536].
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let ws: Vec<(usize, usize, Vec<f32>)> = (0..30 * shapes.len())
        .map(|i| {
            let (n, k) = shapes[i % shapes.len()];
            (n, k, pseudo(n * k, 2 + i as u64))
        })
        .collect();
    // Per level, and beside the gemm crate's x-left path (`matmul_xwt`, what rows past MAX_ROWS
    // take): where it overtakes the tile.
    for m in [1, 8, 16, 24, 32, 48] {
        let xs: Vec<Vec<f32>> = ws.iter().map(|(_, k, _)| pseudo(m * k, 1)).collect();
        let flop: usize = ws.iter().map(|(n, k, _)| 2 * m * n * k).sum();
        // The tile on `Some(level)`, `matmul_xwt` on None.
        let time = |level: Option<Level>| {
            crate::kernels::gflops(flop as f64, &mut || {
                for ((n, k, w), x) in ws.iter().zip(&xs) {
                    match level {
                        Some(l) => {
                            std::hint::black_box(small_rows_at(l, x, &F32Rows(w), m, *n, *k))
                        }
                        None => {
                            std::hint::black_box(crate::kernels::gemm::matmul_xwt(x, m, *k, w, *n))
                        }
                    };
                }
            })
        };
        for level in crate::kernels::simd::test_levels("matmul_small") {
            let g = time(Some(level));
            let gbs = g * 4.0 / (2.0 * m as f64);
            println!(
                "{level:?} m={m}, 30 layers streamed: {g:.1} GFLOP/s ({gbs:.1} GB/s of weights)"
            );
        }
        println!(
            "matmul_xwt m={m}, 30 layers streamed: {:.1} GFLOP/s",
            time(None)
        );
    }
    // Each projection's shape alone, streamed (the 8 layers' copies of it in turn): where
    // the streamed figure above loses against the L2 one.
    for m in [16, 32] {
        for (s, (n, k)) in shapes.iter().enumerate() {
            let mine: Vec<&(usize, usize, Vec<f32>)> =
                ws.iter().skip(s).step_by(shapes.len()).collect();
            let x = pseudo(m * k, 1);
            let level = crate::kernels::simd::level();
            let flop = (2 * m * n * k * mine.len()) as f64;
            let g = crate::kernels::gflops(flop, &mut || {
                for (n, k, w) in &mine {
                    std::hint::black_box(small_rows_at(level, &x, &F32Rows(w), m, *n, *k));
                }
            });
            println!("{level:?} m={m} [{n}, {k}] x8 streamed: {g:.1} GFLOP/s");
        }
    }
}
