use super::attention;
use crate::kernels::pseudo;
use crate::model::mask::PadLayout;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

/// Attention composed of candle's ops (the GPU's training path, `device_ops`), mask
/// `[B, 1, T, S]`, in the fused op's `[B, T, NH * D]` layout.
fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let out = crate::kernels::device_ops::attention_with(
        q,
        k,
        v,
        mask,
        scale,
        softcap,
        crate::kernels::device_ops::Softmax::Differentiable,
    )?;
    Ok(out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

struct Case {
    nh: usize,
    nkv: usize,
    t: usize,
    d: usize,
    pads: Vec<usize>,
    window: Option<usize>,
    scale: f64,
    softcap: Option<f64>,
}

/// Largest `|a - b| / max(1, |b|)`; fails on any NaN.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?,
    );
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.is_finite() && y.is_finite(),
            "non-finite value {x} vs {y}"
        );
        worst = worst.max((x - y).abs() / y.abs().max(1.0));
    }
    Ok(worst)
}

/// q, k, v as the decoder makes them (strided views of one qkv projection), the op and the
/// reference on them, and the gradients of `sum(out * coef)` for q, k and v.
fn check(c: &Case, seed: u64) -> Result<()> {
    let dev = Device::Cpu;
    let (b, t, d) = (c.pads.len(), c.t, c.d);
    let width = (c.nh + 2 * c.nkv) * d;
    let qkv = Var::from_tensor(
        &(Tensor::from_vec(pseudo(b * t * width, seed), (b, t, width), &dev)? * 4.0)?,
    )?;
    let heads = |start: usize, n: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, start * d, n * d)?
            .reshape((b, t, n, d))?
            .transpose(1, 2)?)
    };
    let (q, k, v) = (
        heads(0, c.nh)?,
        heads(c.nh, c.nkv)?,
        heads(c.nh + c.nkv, c.nkv)?,
    );
    assert!(
        !q.is_contiguous() && !k.is_contiguous(),
        "the op must see strided inputs"
    );
    let mask = model_mask(&c.pads, t, c.window);
    let mask_t = Tensor::from_vec(mask.clone(), (b, 1, t, t), &dev)?;
    let coef = Tensor::from_vec(pseudo(b * t * c.nh * d, seed + 1), (b, t, c.nh * d), &dev)?;

    let out = attention(&q, &k, &v, &mask, c.scale, c.softcap)?;
    let (kc, vc) = (k.contiguous()?, v.contiguous()?);
    let want = reference(&q, &kc, &vc, &mask_t, c.scale, c.softcap)?;
    assert!(out.is_contiguous());
    let e = rel_err(&out, &want)?;
    println!("values: error {e:.2e}");
    assert!(e < 1e-5, "values differ by {e}");

    let grads = (out * &coef)?.sum_all()?.backward()?;
    let want_grads = (want * &coef)?.sum_all()?.backward()?;
    // Only leaves keep gradients: q's, k's and v's are the column blocks of qkv's.
    let (g, w) = (grads.get(&qkv).unwrap(), want_grads.get(&qkv).unwrap());
    for (name, start, n) in [
        ("q", 0, c.nh),
        ("k", c.nh, c.nkv),
        ("v", c.nh + c.nkv, c.nkv),
    ] {
        let (g, w) = (
            g.narrow(2, start * d, n * d)?,
            w.narrow(2, start * d, n * d)?,
        );
        let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(scale > 1e-3, "d{name} is trivially small ({scale})");
        let e = rel_err(&g, &w)?;
        println!("d{name}: max |grad| {scale:.3}, error {e:.2e}");
        assert!(e < 1e-5, "d{name} differs by {e} (largest |grad| {scale})");
    }
    Ok(())
}

fn case(nh: usize, nkv: usize, t: usize, d: usize, pads: &[usize]) -> Case {
    Case {
        nh,
        nkv,
        t,
        d,
        pads: pads.to_vec(),
        window: None,
        scale: 1.0 / (d as f64).sqrt(),
        softcap: None,
    }
}

#[test]
fn multi_head() -> Result<()> {
    check(&case(4, 4, 16, 16, &[0, 0]), 1)
}

#[test]
fn grouped_query() -> Result<()> {
    check(&case(4, 2, 16, 8, &[0, 0]), 2)?;
    check(&case(9, 3, 24, 64, &[0, 0]), 3)
}

#[test]
fn left_padding_differs_per_row() -> Result<()> {
    check(&case(4, 2, 12, 16, &[0, 3, 7]), 4)?;
    check(&case(6, 3, 20, 8, &[5, 0]), 5)
}

#[test]
fn sliding_window() -> Result<()> {
    let mut c = case(4, 2, 20, 16, &[0, 4]);
    c.window = Some(5);
    check(&c, 6)
}

#[test]
fn soft_caps_mild_and_saturating() -> Result<()> {
    let mut c = case(4, 2, 16, 64, &[0, 2]);
    c.softcap = Some(50.0);
    check(&c, 7)?;
    // Unscaled scores of magnitude ~5: tanh(score / 2) saturates.
    let mut c = case(4, 2, 16, 16, &[3, 0]);
    c.softcap = Some(2.0);
    c.scale = 1.0;
    check(&c, 8)?;
    // Gemma 2's combination: soft-cap, sliding window, padding, grouped queries.
    c.window = Some(4);
    c.pads = vec![0, 6];
    check(&c, 9)
}

fn var(shape: (usize, usize, usize, usize), seed: u64) -> Result<Var> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(Var::from_tensor(&Tensor::from_vec(
        pseudo(n, seed),
        shape,
        &Device::Cpu,
    )?)?)
}

/// The model's mask for a call of `t` tokens over rows left-padded by `pads`.
fn model_mask(pads: &[usize], t: usize, window: Option<usize>) -> Vec<f32> {
    let layout = PadLayout {
        shared: 0,
        past: 0,
        new_tokens: t,
    };
    layout.additive_mask(pads, window)
}

/// A caller's mask may hide every key of a row: zeros there (the composed softmax gives
/// NaN), the other rows as the reference, and finite gradients.
#[test]
fn fully_masked_row_is_zero_not_nan() -> Result<()> {
    let (b, h, t, d) = (1, 2, 6, 8);
    let (q, k, v) = (
        var((b, h, t, d), 10)?,
        var((b, h, t, d), 11)?,
        var((b, h, t, d), 12)?,
    );
    let mut mask = model_mask(&[0], t, None);
    mask[2 * t..3 * t].fill(f32::NEG_INFINITY);
    let out = attention(&q, &k, &v, &mask, 0.5, Some(3.0))?;
    let row = out.get(0)?.get(2)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(row, 0.0);
    let mask_t = Tensor::from_vec(mask.clone(), (b, 1, t, t), &Device::Cpu)?;
    let want = reference(&q, &k, &v, &mask_t, 0.5, Some(3.0))?;
    for r in [0, 1, 3, 4, 5] {
        let e = rel_err(&out.get(0)?.get(r)?, &want.get(0)?.get(r)?)?;
        assert!(e < 1e-5, "row {r} differs by {e}");
    }
    let grads = out.sum_all()?.backward()?;
    for x in [&q, &k, &v] {
        let g = grads.get(x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|x| x.is_finite()));
    }
    Ok(())
}

/// The saved buffer is taken by the first backward; a second one recomputes it.
#[test]
fn second_backward_matches_first() -> Result<()> {
    let (b, h, t, d) = (2, 2, 8, 8);
    let (q, k, v) = (
        var((b, h, t, d), 20)?,
        var((b, h, t, d), 21)?,
        var((b, h, t, d), 22)?,
    );
    let mask = model_mask(&[0, 2], t, None);
    let out = attention(&q, &k, &v, &mask, 0.3, Some(1.0))?;
    let loss = out.sqr()?.sum_all()?;
    let (g1, g2) = (loss.backward()?, loss.backward()?);
    for x in [&q, &k, &v] {
        assert_eq!(rel_err(g2.get(x).unwrap(), g1.get(x).unwrap())?, 0.0);
    }
    Ok(())
}

/// `CANDLE_NUM_THREADS=1 cargo test --release -p sl-engine --lib attention::tests::timing
/// -- --ignored --nocapture` (one element-wise thread, as the CLI runs): milliseconds per
/// forward, and per forward+backward of `sum(out * coef)`, at SmolLM2's shape.
#[test]
#[ignore]
fn timing() -> Result<()> {
    let (b, nh, nkv, t, d) = (4, 9, 3, 128, 64);
    let (q, k, v) = (
        var((b, nh, t, d), 30)?,
        var((b, nkv, t, d), 31)?,
        var((b, nkv, t, d), 32)?,
    );
    let mask = model_mask(&[0, 5, 17, 40], t, None);
    let mask_t = Tensor::from_vec(mask.clone(), (b, 1, t, t), &Device::Cpu)?;
    let coef = Tensor::from_vec(pseudo(b * t * nh * d, 33), (b, t, nh * d), &Device::Cpu)?;
    let time = |backward: bool, f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let reps = 20;
        let start = std::time::Instant::now();
        for _ in 0..=reps {
            let out = f()?;
            if backward {
                (out * &coef)?.sum_all()?.backward()?;
            }
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / (reps + 1) as f64)
    };
    for cap in [None, Some(50.0)] {
        let fused = || attention(&q, &k, &v, &mask, 0.125, cap);
        let composed = || reference(&q, &k, &v, &mask_t, 0.125, cap);
        println!(
            "soft-cap {cap:?}: forward fused {:.2} ms, composed {:.2} ms; forward+backward \
             fused {:.2} ms, composed {:.2} ms",
            time(false, &fused)?,
            time(false, &composed)?,
            time(true, &fused)?,
            time(true, &composed)?
        );
    }
    Ok(())
}
