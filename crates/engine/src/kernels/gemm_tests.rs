//! Tests of the gemm front (`gemm.rs`): products against naive ones, column bands and the
//! x-left path against the crate's own threading to the bit, bf16 precision, and timings.

mod products {
    use super::super::*;
    use crate::kernels::pseudo;

    fn naive(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, k: usize, n: usize) -> Vec<f32> {
        let ga = |i: usize, j: usize| if at { a[j * m + i] } else { a[i * k + j] };
        let gb = |i: usize, j: usize| if bt { b[j * k + i] } else { b[i * n + j] };
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| ga(i, p) as f64 * gb(p, j) as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// `matmul_xwt` gives `matmul_new`'s values to the bit: row counts with and without a
    /// 16-row tail, one row, more columns than a sub-band, narrow outputs a single band takes.
    #[test]
    fn x_as_the_left_operand_gives_the_same_bits() {
        for (m, k, n) in [
            (1, 9, 5),
            (24, 576, 960),
            (33, 576, 960),
            (48, 64, 7),
            (128, 576, 1100),
            (200, 31, 1500),
            (700, 40, 48),
        ] {
            let (x, w) = (pseudo(m * k, 1), pseudo(n * k, 2));
            let want = matmul_new(Mat::new(&x, m, k), Mat::new(&w, n, k).t(), true);
            let got = matmul_xwt(&x, m, k, &w, n);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "m={m} k={k} n={n}");
        }
    }

    /// Weight rows widened a sub-band at a time (a dequantized or bf16 weight) give the f32
    /// weight's bits: both run the same gemm calls. k = 1536 caps the sub-band by the
    /// widening buffer's size, so several sub-bands run per thread.
    #[test]
    fn widened_rows_give_the_f32_weights_bits() {
        use crate::kernels::CopiedRows as Copied;
        for (m, k, n) in [(17, 1536, 1100), (32, 576, 960), (100, 40, 70)] {
            let (x, w) = (pseudo(m * k, 1), pseudo(n * k, 2));
            let want = matmul_xwt(&x, m, k, &w, n);
            let got = matmul_xwt_rows(&x, m, k, &Copied(&w, k), n);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "m={m} k={k} n={n}"
            );
        }
    }

    #[test]
    fn every_transpose_combination_and_accumulation_match_the_naive_product() {
        let (m, k, n) = (13, 29, 7);
        for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = pseudo(m * k, 1);
            let b = pseudo(k * n, 2);
            let am = if at {
                Mat::new(&a, k, m).t()
            } else {
                Mat::new(&a, m, k)
            };
            let bm = if bt {
                Mat::new(&b, n, k).t()
            } else {
                Mat::new(&b, k, n)
            };
            let want = naive(&a, at, &b, bt, m, k, n);
            // Written into columns 2..2+n of a wider destination, then accumulated once more.
            let stride = n + 3;
            let mut dst = vec![9f32; m * stride];
            matmul(&mut dst[2..], stride, am, bm, false, true);
            matmul(&mut dst[2..], stride, am, bm, true, false);
            for i in 0..m {
                assert_eq!(dst[i * stride], 9.0);
                for j in 0..n {
                    let got = dst[i * stride + 2 + j];
                    assert!(
                        (got - 2.0 * want[i * n + j]).abs() < 1e-5,
                        "{at} {bt} {i} {j}"
                    );
                }
            }
        }
    }
}

mod band_tests {
    use super::super::*;
    use crate::kernels::pseudo;

    /// `x · Wᵀ` wide enough to run in column bands (bands of odd widths, into the middle
    /// columns of a wider destination, then accumulated): equal to the bit to the one-thread
    /// gemm, and to f64 math within f32 rounding. Run on a pool of 3 threads, so that there
    /// are three bands whatever the machine (n is wide enough for 3 x MIN_BAND).
    #[test]
    fn bands_equal_the_one_thread_product_to_the_bit() {
        let (m, k, n) = (37, 70, 3 * MIN_BAND + 45);
        let (x, w) = (pseudo(m * k, 5), pseudo(n * k, 6));
        let (xm, wm) = (Mat::new(&x, m, k), Mat::new(&w, n, k).t());
        let stride = n + 9;
        let run = |parallel: bool| {
            let mut dst = vec![3f32; m * stride];
            matmul(&mut dst[4..], stride, xm, wm, false, parallel);
            matmul(&mut dst[4..], stride, xm, wm, true, parallel);
            dst
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let banded = pool.install(|| run(true));
        let single = run(false);
        assert!(banded == single, "bands differ from the one-thread product");
        for i in 0..m {
            for c in (0..4).chain(n + 4..stride) {
                assert_eq!(banded[i * stride + c], 3.0, "wrote outside the columns");
            }
            for j in 0..n {
                let e: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                let g = banded[i * stride + 4 + j] as f64;
                assert!((g - 2.0 * e).abs() < 1e-4, "({i},{j}): {g} vs {}", 2.0 * e);
            }
        }
    }

    /// The inference prefill's entry: candle's matmul to the bit (candle runs the same gemm with
    /// the crate's threading), and None for a tensor autograd tracks.
    #[test]
    fn linear_f32_equals_candles_matmul_to_the_bit() -> anyhow::Result<()> {
        use candle_core::{Device, Tensor, Var};
        let (m, k, n) = (40, 70, 3 * MIN_BAND + 13);
        let x = Tensor::from_vec(pseudo(m * k, 7), (m, k), &Device::Cpu)?;
        let w = Tensor::from_vec(pseudo(n * k, 8), (n, k), &Device::Cpu)?;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build()?;
        let got = pool.install(|| linear_f32(&x, &w))?.expect("qualifies");
        let want = x.matmul(&w.t()?)?;
        assert_eq!(got.dims(), want.dims());
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert!(flat(&got)? == flat(&want)?, "differs from candle's matmul");
        let tracked = Var::from_tensor(&x)?;
        assert!(linear_f32(tracked.as_tensor(), &w)?.is_none());
        Ok(())
    }
}

mod precision_tests {
    use super::super::*;
    use crate::kernels::pseudo;

    /// bf16 precision (AMX or `vdpbf16ps` where the CPU has them, rounded copies otherwise)
    /// against f64 math on the bf16-rounded operands, for the three operand forms of a training linear; and not
    /// equal to the f32 product (the rounding happened).
    #[test]
    fn bf16_rounds_both_operands_and_sums_in_f32() {
        let r = |x: f32| half::bf16::from_f32(x).to_f64();
        let (m, k, n) = (37, 70, 45);
        let (x, w, dy) = (pseudo(m * k, 1), pseudo(n * k, 2), pseudo(m * n, 3));
        // y = x·wᵀ, dx = dy·w, dw = dyᵀ·x.
        let cases: [(Mat, Mat, usize, usize, usize); 3] = [
            (Mat::new(&x, m, k), Mat::new(&w, n, k).t(), m, n, k),
            (Mat::new(&dy, m, n), Mat::new(&w, n, k), m, k, n),
            (Mat::new(&dy, m, n).t(), Mat::new(&x, m, k), n, k, m),
        ];
        for (a, b, rows, cols, inner) in cases {
            let mut got = vec![0f32; rows * cols];
            let mut f32_ = vec![0f32; rows * cols];
            matmul_in(Precision::Bf16, &mut got, cols, a, b, false, true);
            matmul_in(Precision::F32, &mut f32_, cols, a, b, false, true);
            let mut differs = false;
            for i in 0..rows {
                for j in 0..cols {
                    let e: f64 = (0..inner).map(|p| r(a.at(i, p)) * r(b.at(p, j))).sum();
                    let g = got[i * cols + j] as f64;
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "({i},{j}): {g} vs {e}"
                    );
                    differs |= got[i * cols + j] != f32_[i * cols + j];
                }
            }
            assert!(differs, "bf16 gave the f32 product bit for bit");
        }
    }
}

mod timing {
    use super::super::*;

    /// GFLOP/s of the training shapes (SmolLM2, 433 rows) and of a prefill (256 rows):
    /// forward, input and weight gradient, threaded in column bands (`matmul`) and by the gemm
    /// crate itself.
    #[test]
    #[ignore]
    fn training_shapes() {
        for n in [crate::kernels::TRAINING_ROWS, 256] {
            for (inp, out) in crate::kernels::TRAINING_SHAPES {
                let x = vec![0.5f32; n * inp];
                let w = vec![0.25f32; out * inp];
                let dy = vec![0.125f32; n * out];
                let mut y = vec![0f32; n * out];
                let mut dx = vec![0f32; n * inp];
                let mut dw = vec![0f32; out * inp];
                let flops = 2.0 * (n * inp * out) as f64;
                let time = |f: &mut dyn FnMut()| crate::kernels::gflops(flops, f);
                let (xm, wm, dym) = (
                    Mat::new(&x, n, inp),
                    Mat::new(&w, out, inp),
                    Mat::new(&dy, n, out),
                );
                let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
                let run = |dst: &mut [f32], cols, a: Mat, b: Mat, acc| {
                    let bands = time(&mut || matmul(dst, cols, a, b, acc, true));
                    let crate_ =
                        time(&mut || unsafe { call(dst.as_mut_ptr(), cols, a, b, acc, threads) });
                    format!("{bands:.0} ({crate_:.0})")
                };
                let fwd = run(&mut y, out, xm, wm.t(), false);
                let bx = run(&mut dx, inp, dym, wm, false);
                let bw = run(&mut dw, inp, dym.t(), xm, true);
                eprintln!("[{n}x{inp}] x [{inp}x{out}] GFLOP/s in bands (the gemm crate's threads): fwd {fwd}, dx {bx}, dW {bw}");
            }
        }
    }
}
