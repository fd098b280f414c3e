//! Tests of the CPU attention kernel (`attention.rs`).
use super::{attention, attention_at, axpy_at, dot_at};
use crate::kernels::simd::{test_levels, Level};
use crate::model::mask::PadLayout;
use candle_core::{Device, Tensor};

/// Deterministic values in [-2, 2) (an LCG: no dependency, the same cases every run).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Attention restated with plain loops in f64: query head `hi` reads kv head
/// `hi / (H / Hkv)`; a row with every key masked is zero.
#[allow(clippy::too_many_arguments)]
fn naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    (b, h, hkv, t, s, d): (usize, usize, usize, usize, usize, usize),
    scale: f32,
    softcap: Option<f32>,
) -> Vec<f32> {
    let mut out = vec![0f32; b * h * t * d];
    for bi in 0..b {
        for hi in 0..h {
            let kvh = hi / (h / hkv);
            for ti in 0..t {
                let qi = ((bi * h + hi) * t + ti) * d;
                let mut scores = vec![f64::NEG_INFINITY; s];
                for (si, sc) in scores.iter_mut().enumerate() {
                    let m = mask[(bi * t + ti) * s + si];
                    if m == f32::NEG_INFINITY {
                        continue;
                    }
                    let ki = ((bi * hkv + kvh) * s + si) * d;
                    let mut x = 0f64;
                    for j in 0..d {
                        x += q[qi + j] as f64 * k[ki + j] as f64;
                    }
                    x *= scale as f64;
                    if let Some(c) = softcap {
                        x = (x / c as f64).tanh() * c as f64;
                    }
                    *sc = x + m as f64;
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                for (si, wi) in w.iter().enumerate() {
                    let vi = ((bi * hkv + kvh) * s + si) * d;
                    for j in 0..d {
                        out[qi + j] += (wi / sum * v[vi + j] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

/// Runs the kernel and the reference on random q, k, v of the given heads with `mask` of
/// `b` rows, `t` queries and `s` keys; returns the kernel's output after comparing.
fn check(
    (b, h, hkv, t, s): (usize, usize, usize, usize, usize),
    mask: &[f32],
    softcap: Option<f32>,
    what: &str,
) -> Vec<f32> {
    let d = 8;
    let (q, k, v) = (
        values(b * h * t * d, 1),
        values(b * hkv * s * d, 2),
        values(b * hkv * s * d, 3),
    );
    let dev = &Device::Cpu;
    let out = attention(
        &Tensor::from_slice(&q, (b, h, t, d), dev).unwrap(),
        &Tensor::from_slice(&k, (b, hkv, s, d), dev).unwrap(),
        &Tensor::from_slice(&v, (b, hkv, s, d), dev).unwrap(),
        mask,
        0.35,
        softcap,
    )
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    let want = naive(&q, &k, &v, mask, (b, h, hkv, t, s, d), 0.35, softcap);
    for (i, (x, y)) in out.iter().zip(&want).enumerate() {
        assert!(
            x.is_finite() && (x - y).abs() < 1e-5,
            "{what}: element {i}: kernel {x}, reference {y}"
        );
    }
    out
}

fn layout(shared: usize, past: usize, new_tokens: usize) -> PadLayout {
    PadLayout {
        shared,
        past,
        new_tokens,
    }
}

#[test]
fn grouped_query_heads_match_the_reference() {
    let mask = layout(0, 0, 5).additive_mask(&[0, 0], None);
    for (h, hkv) in [(4, 4), (4, 2), (4, 1)] {
        check((2, h, hkv, 5, 5), &mask, None, &format!("{h}/{hkv} heads"));
    }
}

#[test]
fn soft_cap_matches_the_reference() {
    let mask = layout(0, 2, 4).additive_mask(&[0], None);
    for cap in [1.0, 5.0, 50.0] {
        check(
            (1, 4, 2, 4, 6),
            &mask,
            Some(cap),
            &format!("soft-cap {cap}"),
        );
    }
}

#[test]
fn sliding_window_padding_and_shared_head_match_the_reference() {
    // Rows padded by 0, 2 and 3 tokens after a shared head of 2, with cached positions.
    let l = layout(2, 3, 4);
    let pads = [0, 2, 3];
    for window in [None, Some(1), Some(2), Some(4)] {
        let mask = l.additive_mask(&pads, window);
        check((3, 4, 2, 4, 7), &mask, None, &format!("window {window:?}"));
    }
    // Decoding one token after padded prompts, sliding window and soft-cap together.
    let mask = layout(0, 6, 1).additive_mask(&[0, 4], Some(3));
    check((2, 4, 1, 1, 7), &mask, Some(30.0), "decode step");
}

#[test]
fn a_fully_masked_row_is_zero_not_nan() {
    let (b, t, s) = (2, 3, 4);
    let mut mask = layout(0, 1, 3).additive_mask(&[0, 1], None);
    // Row 1's second query sees nothing.
    mask[(t + 1) * s..(t + 2) * s].fill(f32::NEG_INFINITY);
    let out = check((b, 4, 2, t, s), &mask, None, "masked row");
    let d = 8;
    for hi in 0..4 {
        let at = ((4 + hi) * t + 1) * d;
        assert!(out[at..at + d].iter().all(|&x| x == 0.0), "head {hi}");
    }
}

#[test]
fn a_mask_of_the_wrong_length_is_an_error() {
    let dev = &Device::Cpu;
    let q = Tensor::zeros((2, 4, 3, 8), candle_core::DType::F32, dev).unwrap();
    let kv = Tensor::zeros((2, 2, 5, 8), candle_core::DType::F32, dev).unwrap();
    let e = attention(&q, &kv, &kv, &[0.0; 2 * 3 * 5 - 1], 1.0, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mask has 29 values") && e.contains("2*3*5 = 30"),
        "{e}"
    );
    let kv3 = Tensor::zeros((2, 3, 5, 8), candle_core::DType::F32, dev).unwrap();
    let e = attention(&q, &kv3, &kv3, &[0.0; 30], 1.0, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a multiple"), "{e}");
}

/// Σ|a·b| over a dot product: f32 rounding of any summation order is a small multiple of
/// eps times it.
fn abs_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum()
}

#[test]
fn dot_and_axpy_match_scalar_on_every_level() {
    for level in test_levels("attention dot/axpy") {
        for k in [0, 1, 7, 8, 15, 16, 17, 31, 33, 64, 80, 127, 1000, 4099] {
            let (a, b) = (values(k, 4), values(k, 5));
            let (got, want) = (dot_at(level, &a, &b), dot_at(Level::Scalar, &a, &b));
            let tol = 4.0 * f32::EPSILON * (k as f32).sqrt() * abs_dot(&a, &b);
            assert!(
                (got - want).abs() <= tol,
                "{level:?} dot k={k}: {got} vs {want}"
            );
            let (mut o, mut o_ref) = (values(k, 6), values(k, 6));
            axpy_at(level, 0.37, &b, &mut o);
            axpy_at(Level::Scalar, 0.37, &b, &mut o_ref);
            for (i, (x, y)) in o.iter().zip(&o_ref).enumerate() {
                // FMA rounds once where the scalar path rounds twice.
                let tol = 2.0 * f32::EPSILON * (y.abs() + (0.37 * b[i]).abs());
                assert!(
                    (x - y).abs() <= tol,
                    "{level:?} axpy k={k} at {i}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn attention_matches_scalar_on_every_level() {
    let dev = &Device::Cpu;
    for level in test_levels("attention") {
        // Head widths with and without vector tails; 1-4 query rows; a long cache.
        for (d, t, s) in [
            (7, 1, 5),
            (17, 3, 9),
            (64, 4, 300),
            (80, 2, 33),
            (131, 1, 70),
        ] {
            let (b, h, hkv) = (2, 4, 2);
            let mask = layout(0, s - t, t).additive_mask(&[0, 1], Some(s - 2));
            let q = Tensor::from_vec(values(b * h * t * d, 7), (b, h, t, d), dev).unwrap();
            let k = Tensor::from_vec(values(b * hkv * s * d, 8), (b, hkv, s, d), dev).unwrap();
            let v = Tensor::from_vec(values(b * hkv * s * d, 9), (b, hkv, s, d), dev).unwrap();
            let run = |l| {
                let o = attention_at(l, &q, &k, &v, &mask, 0.125, Some(30.0)).unwrap();
                o.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (got, want) = (run(level), run(Level::Scalar));
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{level:?} d={d} t={t} s={s} at {i}: {x} vs {y}"
                );
            }
        }
    }
}

/// The AVX-512 and AVX2 key blocks give the one-key path's output to the bit: padding and causal
/// masks that leave blocks partly or wholly masked, sliding windows, soft-caps, head widths
/// with and without tails, caches shorter and longer than a block.
#[test]
fn key_blocks_equal_one_key_at_a_time() {
    let dev = &Device::Cpu;
    for level in test_levels("attention key blocks") {
        if !super::takes_blocks(level) {
            continue;
        }
        for (d, t, s, shared, window, cap) in [
            (64, 1, 5, 0, None, None),
            (64, 12, 36, 24, None, None),
            (64, 1, 300, 0, Some(40), None),
            (80, 3, 33, 0, None, Some(30.0)),
            (131, 2, 70, 16, Some(20), Some(50.0)),
            (7, 5, 17, 0, None, None),
        ] {
            let (b, h, hkv) = (3, 6, 2);
            let mask = layout(shared, s - t, t).additive_mask(&[0, 3, 17], window);
            let q = Tensor::from_vec(values(b * h * t * d, 1), (b, h, t, d), dev).unwrap();
            let k = Tensor::from_vec(values(b * hkv * s * d, 2), (b, hkv, s, d), dev).unwrap();
            let v = Tensor::from_vec(values(b * hkv * s * d, 3), (b, hkv, s, d), dev).unwrap();
            let run = |blocks| {
                let o = super::attention_keys(level, blocks, &q, &k, &v, &mask, 0.125, cap);
                let o = o.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(true), run(false), "{level:?} d={d} t={t} s={s}");
        }
    }
}

/// Keys and values read as the first S positions of longer buffers (the KV cache's views)
/// give the contiguous copies' output to the bit, on every level; a layout that is not
/// evenly spaced (a transposed view) is copied first and gives it too.
#[test]
fn views_of_longer_buffers_are_read_in_place() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (b, h, hkv, t, s, d, room) = (2, 4, 2, 3, 5, 8, 4);
    let q = Tensor::from_vec(values(b * h * t * d, 1), (b, h, t, d), &dev)?;
    let kb = Tensor::from_vec(
        values(b * hkv * (s + room) * d, 2),
        (b, hkv, s + room, d),
        &dev,
    )?;
    let vb = Tensor::from_vec(
        values(b * hkv * (s + room) * d, 3),
        (b, hkv, s + room, d),
        &dev,
    )?;
    let (k, v) = (kb.narrow(2, 0, s)?, vb.narrow(2, 0, s)?);
    assert!(!k.is_contiguous());
    let mask = vec![0f32; b * t * s];
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    for level in test_levels("attention") {
        let want = attention_at(
            level,
            &q,
            &k.contiguous()?,
            &v.contiguous()?,
            &mask,
            0.3,
            None,
        )?;
        let got = attention_at(level, &q, &k, &v, &mask, 0.3, None)?;
        assert_eq!(flat(&got)?, flat(&want)?, "{level:?}");
        let kt = k
            .contiguous()?
            .transpose(2, 3)?
            .contiguous()?
            .transpose(2, 3)?;
        let odd = attention_at(level, &q, &kt, &v, &mask, 0.3, None)?;
        assert_eq!(flat(&odd)?, flat(&want)?, "{level:?}: transposed keys");
    }
    Ok(())
}
