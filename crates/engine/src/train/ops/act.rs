//! The gated MLP's `act(gate) · up` as one op with a backward pass, reading the fused gate/up
//! projection's output in place: the composed version (two narrows, the activation, a mul)
//! copies both halves, keeps the activation's input and output for backward, and recomputes
//! the activation's derivative from several more full-size tensors.

use super::rows::{input_rows, rows_per_task, rows_readable, with_rows, Rows};
use crate::io::config::Activation;
use crate::kernels::mem::for_overwrite;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// candle's constant for the tanh approximation (op.rs), so values agree to the last bit.
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;
/// 1/sqrt(2π), the standard normal density's factor.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// e^x within ~2 ulp (Cephes' expf polynomial), branch-free so that loops over rows vectorise:
/// libm's expf and tanhf are one call per element and bound the whole op.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Bounds keep 2^n a normal float; beyond them e^x under- or overflows for our purposes.
    let x = x.clamp(-87.3, 88.3);
    // Round to nearest by adding 1.5·2^23 (f32::round is a libm call on baseline x86-64); the
    // sum's low mantissa bits then hold n itself, read back below as 2^n's exponent bits
    // (`n as i32` is a saturating conversion that keeps the loop scalar).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let biased = shifted
        .to_bits()
        .wrapping_sub(MAGIC.to_bits())
        .wrapping_add(127);
    e * f32::from_bits(biased << 23)
}

/// tanh through [`exp`]; near zero its absolute error is ~1e-7, which is all GELU's `1 + t`
/// and `1 - t²` see.
#[inline(always)]
fn tanh(z: f32) -> f32 {
    let e = exp(-2.0 * z.abs());
    ((1.0 - e) / (1.0 + e)).copysign(z)
}

/// The activation with candle's forward formulas (op.rs `Silu`, `Gelu`, `GeluErf`).
#[inline(always)]
fn value(act: Activation, v: f32) -> f32 {
    match act {
        Activation::Silu => v / (1.0 + exp(-v)),
        Activation::GeluTanh => {
            0.5 * v * (1.0 + tanh(SQRT_TWO_OVER_PI * v * (1.0 + GELU_CUBIC * v * v)))
        }
        Activation::Gelu => {
            (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
        }
    }
}

/// The activation and its exact derivative (candle's backward rounds some constants to six
/// digits; these differ from it by ~1e-6 relative).
#[inline(always)]
fn value_and_slope(act: Activation, v: f32) -> (f32, f32) {
    match act {
        Activation::Silu => {
            let e = exp(-v);
            let sig = 1.0 / (1.0 + e);
            let a = v / (1.0 + e);
            (a, sig + a * (1.0 - sig))
        }
        Activation::GeluTanh => {
            let v2 = v * v;
            let th = tanh(SQRT_TWO_OVER_PI * v * (1.0 + GELU_CUBIC * v2));
            let inner_slope = SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * v2);
            (
                0.5 * v * (1.0 + th),
                0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * inner_slope,
            )
        }
        Activation::Gelu => {
            let cdf =
                (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5;
            (cdf * v, cdf + v * exp(-0.5 * v * v) * FRAC_1_SQRT_2PI)
        }
    }
}

/// Runs `row(gate_up_row, out_row)` over all rows in rayon tasks; `out` rows are `out_width`.
fn for_rows(
    x: &[f32],
    xr: &Rows,
    out_width: usize,
    row: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let n = xr.count;
    // SAFETY: every caller's `row` sets its whole output row without reading it.
    let mut out = unsafe { for_overwrite(n * out_width) };
    let per = rows_per_task(n, xr.width);
    out.par_chunks_mut(per * out_width)
        .enumerate()
        .for_each(|(ci, oc)| {
            for (j, orow) in oc.chunks_exact_mut(out_width).enumerate() {
                row(xr.row(x, ci * per + j), orow);
            }
        });
    out
}

/// One match per call, not per element: each arm's loop is specialised to its activation.
macro_rules! per_activation {
    ($act:expr, $f:ident) => {
        match $act {
            Activation::Silu => $f!(Activation::Silu),
            Activation::GeluTanh => $f!(Activation::GeluTanh),
            Activation::Gelu => $f!(Activation::Gelu),
        }
    };
}

/// `act(gate) · up` of each row of `x` (`[count, 2I]`): `[count, I]`, packed.
pub(super) fn forward(x: &[f32], xr: &Rows, act: Activation) -> Vec<f32> {
    let i = xr.width / 2;
    macro_rules! fwd {
        ($a:expr) => {
            for_rows(x, xr, i, |xrow, y| {
                let (gate, up) = xrow.split_at(i);
                for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    *o = value($a, g) * u;
                }
            })
        };
    }
    per_activation!(act, fwd)
}

/// The gradient of `act(gate) · up` with respect to each row of `x` (`[count, 2I]`), given the
/// output's gradient rows `g` (`[count, I]`).
pub(super) fn backward(xd: &[f32], xr: &Rows, gd: &[f32], gr: &Rows, act: Activation) -> Vec<f32> {
    let i = xr.width / 2;
    // Rows of the gradient are found by index: for_rows hands out input rows only.
    let per = rows_per_task(xr.count, xr.width);
    // SAFETY: each row's gate and up halves are both set below, never read.
    let mut dx = unsafe { for_overwrite(xr.count * xr.width) };
    macro_rules! bwd {
        ($a:expr) => {
            dx.par_chunks_mut(per * xr.width)
                .enumerate()
                .for_each(|(ci, dc)| {
                    for (j, drow) in dc.chunks_exact_mut(xr.width).enumerate() {
                        let row = ci * per + j;
                        let (gate, up) = xr.row(xd, row).split_at(i);
                        let grow = gr.row(gd, row);
                        let (dgate, dup) = drow.split_at_mut(i);
                        let ins = gate.iter().zip(up).zip(grow);
                        let outs = dgate.iter_mut().zip(dup.iter_mut());
                        for (((&v, &u), &gy), (dg, du)) in ins.zip(outs) {
                            let (a, slope) = value_and_slope($a, v);
                            *dg = gy * u * slope;
                            *du = gy * a;
                        }
                    }
                })
        };
    }
    per_activation!(act, bwd);
    dx
}

struct GatedOp {
    act: Activation,
}

/// Checks `[..., 2I]` and returns `I`.
fn half_width(w: usize) -> candle_core::Result<usize> {
    if !w.is_multiple_of(2) {
        candle_core::bail!("gated: last dimension {w} is not gate and up of equal size");
    }
    Ok(w / 2)
}

impl CustomOp1 for GatedOp {
    fn name(&self) -> &'static str {
        "fused-gated-act"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, xr) = input_rows(xs, xl, "gated")?;
        let i = half_width(xr.width)?;
        let y = forward(x, &xr, self.act);
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = i;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_rows(x, "gated", |xd, xr| {
            let i = half_width(xr.width)?;
            with_rows(g, "gated", |gd, gr| {
                if gr.count != xr.count || gr.width != i {
                    candle_core::bail!("gated: gradient {:?} for input {:?}", g.dims(), x.dims());
                }
                Ok(backward(xd, xr, gd, gr, self.act))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `act(gate) · up` for `gate_up: [..., 2I]` (gate first, as the fused projection stacks them;
/// any layout whose last dimension is packed is read in place). Returns `[..., I]`, contiguous;
/// the backward writes the gradient of `gate_up` in one buffer.
pub fn gated(gate_up: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(rows_readable(gate_up)?.apply_op1(GatedOp { act })?)
}

/// Inference's `act(gate) · up` on an f32 CPU tensor: the training op's values without a
/// backward, in one threaded pass that reads `gate_up` in place (the composed ops, two narrows,
/// candle's activation and a mul, copy both halves and run on one thread here). Its exp and
/// tanh are within ~2 ulp of libm's (`exp_and_tanh_agree_with_libm`), vectorised where libm's
/// are a call per element: on the Xeon of 2026-12-03 libm's values cost 3% of a prefill and
/// 4.7% of generation, and the faster ones changed none of 128 greedy continuations.
pub fn gated_infer(gate_up: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(rows_readable(gate_up)?.apply_op1_no_bwd(&GatedOp { act })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use crate::train::ops::rows::value_and_grad_errs;
    use candle_core::{Device, Var, D};

    /// decoder.rs `mlp` between the projections (narrow, layers.rs `act` copied, mul).
    fn reference(gu: &Tensor, act: Activation) -> Result<Tensor> {
        let i = gu.dim(D::Minus1)? / 2;
        let gate = gu.narrow(D::Minus1, 0, i)?;
        let up = gu.narrow(D::Minus1, i, i)?;
        let a = match act {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::Gelu => gate.gelu_erf()?,
        };
        Ok((a * up)?)
    }

    fn check(dims: &[usize], transpose: bool, act: Activation, tol: f32) -> Result<()> {
        let dev = Device::Cpu;
        let n: usize = dims.iter().product();
        // Spread over [-6, 6) to cover both tails of the activations.
        let xv = Var::from_tensor(&(Tensor::from_vec(pseudo(n, 21), dims, &dev)? * 12.0)?)?;
        let x = if transpose {
            xv.as_tensor().transpose(0, 1)?
        } else {
            xv.as_tensor().clone()
        };
        let mut out = x.dims().to_vec();
        *out.last_mut().unwrap() /= 2;
        let coef = Tensor::from_vec(pseudo(n / 2, 22), out.as_slice(), &dev)?;
        let y_ref = reference(&x, act)?;
        let y = gated(&x, act)?;
        assert!(y.is_contiguous() && y.dims() == out.as_slice());
        let what = format!("{dims:?} transpose {transpose} {act:?}");
        let (e, de, _) = value_and_grad_errs(&y, &y_ref, &coef, &[xv.as_tensor()])?;
        assert!(e < 1e-6, "{what}: values off by {e}");
        assert!(de[0] < tol, "{what}: d(gate_up) off by {}", de[0]);
        Ok(())
    }

    #[test]
    fn inference_values_are_the_training_ops_and_within_rounding_of_the_composed_ops() -> Result<()>
    {
        let dev = Device::Cpu;
        // [-12, 12): both tails, and rows enough for several threads' tasks.
        let gu = (Tensor::from_vec(pseudo(67 * 2 * 300, 23), (67, 600), &dev)? * 24.0)?;
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
            let want = reference(&gu, act)?.flatten_all()?.to_vec1::<f32>()?;
            let got = gated_infer(&gu, act)?.flatten_all()?.to_vec1::<f32>()?;
            let train = gated(&gu, act)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                got == train,
                "{act:?}: inference differs from the training op"
            );
            // Within f32 rounding of the product's scale |gate·up|: near gelu's negative tail
            // 1 + tanh cancels, and an ulp of tanh is all that is left of the value.
            let x = gu.flatten_all()?.to_vec1::<f32>()?;
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let (r, c) = (k / 300, k % 300);
                let scale = (x[r * 600 + c] * x[r * 600 + 300 + c]).abs().max(w.abs());
                assert!(
                    (g - w).abs() <= 1e-6 * scale.max(1e-3),
                    "{act:?} [{k}]: {g} vs the composed ops' {w}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn matches_the_composed_mlp_activation_in_values_and_gradients() -> Result<()> {
        // candle's backward uses six-digit constants (0.797885, 0.398942, ...): its gelu
        // gradients are ~1e-6 relative from the exact ones computed here.
        for (act, tol) in [
            (Activation::Silu, 1e-6),
            (Activation::GeluTanh, 1e-5),
            (Activation::Gelu, 1e-5),
        ] {
            check(&[3, 14], false, act, tol)?;
            check(&[2, 7, 1152], false, act, tol)?;
            check(&[40, 3, 70], true, act, tol)?; // strided rows, several rayon tasks
        }
        Ok(())
    }

    #[test]
    fn exp_and_tanh_agree_with_libm() {
        let (mut worst_exp, mut worst_tanh) = (0f32, 0f32);
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.35e-4; // [-87, 87]
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst_exp = worst_exp.max(rel);
            let z = x / 8.0;
            worst_tanh = worst_tanh.max((tanh(z) - z.tanh()).abs());
        }
        assert!(worst_exp < 3e-7, "exp off by {worst_exp} relative");
        assert!(worst_tanh < 2e-7, "tanh off by {worst_tanh} absolute");
        assert_eq!(
            exp(-1000.0) * 1e30,
            exp(-87.3) * 1e30,
            "clamped, no NaN or garbage"
        );
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn rejects_an_odd_last_dimension() -> Result<()> {
        let x = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu)?;
        assert!(gated(&x, Activation::Silu).is_err());
        Ok(())
    }
}
