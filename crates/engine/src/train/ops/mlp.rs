//! A layer's whole MLP block as one op: `y = x + down(act(gate) · up)` with `gate, up` the
//! projection of `rmsnorm(x)`. Composed of the separate ops (norm, linear, gated, linear, add),
//! candle's backward gives each of the four intermediates a zeroed gradient buffer and an add
//! into it, on one thread while the other waits: about 10 MB of memset and 20 MB of adds per
//! layer and step for SmolLM2 at batch 4 x 128. Here backward runs the same kernels in order
//! and hands candle the two gradients it tracks (the input's, and the norm weight's when it
//! trains); the projections' weight gradients go to their sinks, as the linear op's do.

use super::act;
use super::block::{block, packed_rows, Half, Proj};
use crate::io::config::Activation;
use crate::model::layers::Mlp;
use crate::model::RmsNorm;
use anyhow::Result;
use candle_core::Tensor;

struct MlpHalf {
    act: Activation,
    gate_up: Proj,
    down: Proj,
}

impl Half for MlpHalf {
    /// The projection `[N, 2I]` and the gated activation `[N, I]`.
    type Saved = (Vec<f32>, Vec<f32>);
    const NAME: &'static str = "mlp-block";

    fn check(&self, hid: usize) -> candle_core::Result<()> {
        let ((two_i, gu_in), (d_out, d_in)) = (self.gate_up.dims()?, self.down.dims()?);
        if gu_in != hid || d_out != hid || two_i != 2 * d_in {
            candle_core::bail!(
                "mlp block: rows of {hid}, gate_up [{two_i}, {gu_in}], down [{d_out}, {d_in}]"
            );
        }
        Ok(())
    }

    fn forward(&self, h: &[f32], n: usize) -> candle_core::Result<(Vec<f32>, Self::Saved)> {
        let gate_up = self.gate_up.forward(h, n)?;
        let two_i = self.gate_up.dims()?.0;
        let gated = act::forward(&gate_up, &packed_rows(n, two_i), self.act);
        Ok((self.down.forward(&gated, n)?, (gate_up, gated)))
    }

    fn backward(
        &self,
        (gate_up, gated): &Self::Saved,
        h: &[f32],
        dy: &[f32],
        n: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let two_i = self.gate_up.dims()?.0;
        let d_gated = self.down.backward(dy, gated, n)?;
        let (gu_rows, g_rows) = (packed_rows(n, two_i), packed_rows(n, two_i / 2));
        let d_gate_up = act::backward(gate_up, &gu_rows, &d_gated, &g_rows, self.act);
        drop(d_gated);
        self.gate_up.backward(&d_gate_up, h, n)
    }
}

/// `x + down(act(gate) · up)` of `gate_up(norm(x))` for the packed rows `x: [N, H]`, as one
/// op; `None` when a projection is not one the op runs (the caller composes the block then).
pub fn mlp_block(x: &Tensor, norm: &RmsNorm, mlp: &Mlp, act: Activation) -> Result<Option<Tensor>> {
    let (Some(gate_up), Some(down)) = (Proj::of(&mlp.gate_up), Proj::of(&mlp.down)) else {
        return Ok(None);
    };
    let half = MlpHalf { act, gate_up, down };
    Ok(Some(block(x, norm, half)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Linear;
    use crate::model::weight::Weight;
    use crate::train::ops::block::tests::{linear, randn, sink};
    use crate::train::ops::norm;
    use crate::train::ops::rows::rel_err;
    use candle_core::{DType, Device, Var};

    /// The fused block against the separate ops (norm, linear, gated, linear, add): values,
    /// the input's and the norm weight's gradients, and both projections' sinks.
    fn check(act: Activation, plus_one: bool, trains: bool, norm_trains: bool) -> Result<()> {
        let (n, hid, inter) = (37, 48, 80);
        let x = Var::from_tensor(&randn((n, hid), 1)?)?;
        let w_norm = Tensor::from_vec(crate::kernels::pseudo(hid, 2), hid, &Device::Cpu)?;
        let w_norm = w_norm.affine(0.2, if plus_one { 0.0 } else { 1.0 })?;
        let w_norm_var = Var::from_tensor(&w_norm)?;
        let (w_gu, w_d) = (randn((2 * inter, hid), 3)?, randn((hid, inter), 4)?);
        let coef = randn((n, hid), 5)?;
        let mut results = Vec::new();
        for fused in [false, true] {
            let norm_w = if norm_trains {
                w_norm_var.as_tensor().clone()
            } else {
                w_norm.clone()
            };
            let rms = RmsNorm::new(norm_w, plus_one, 1e-5)?;
            let mlp = Mlp {
                gate_up: linear(&w_gu, trains),
                down: linear(&w_d, trains),
            };
            let y = if fused {
                mlp_block(x.as_tensor(), &rms, &mlp, act)?.expect("the block fuses")
            } else {
                let h = norm::rms_norm(x.as_tensor(), &rms.weight, rms.eps, plus_one)?;
                let g = act::gated(&mlp.gate_up.forward(&h)?, act)?;
                (x.as_tensor() + mlp.down.forward(&g)?)?
            };
            let grads = (&y * &coef)?.sum_all()?.backward()?;
            let dw = norm_trains.then(|| grads.get(w_norm_var.as_tensor()).unwrap().clone());
            results.push((
                y,
                grads.get(x.as_tensor()).unwrap().clone(),
                dw,
                sink(&mlp.gate_up),
                sink(&mlp.down),
            ));
        }
        let (want, got) = (&results[0], &results[1]);
        let tag = format!("{act:?} plus_one {plus_one} trains {trains} norm {norm_trains}");
        assert!(rel_err(&got.0, &want.0)? < 1e-6, "{tag}: values");
        assert!(rel_err(&got.1, &want.1)? < 1e-6, "{tag}: input gradient");
        let pairs = [(&got.2, &want.2), (&got.3, &want.3), (&got.4, &want.4)];
        for (i, (g, w)) in pairs.into_iter().enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => assert!(rel_err(g, w)? < 1e-6, "{tag}: gradient {i}"),
                (None, None) => {}
                _ => panic!("{tag}: gradient {i} present on one side only"),
            }
        }
        assert_eq!(
            got.3.is_some(),
            trains,
            "{tag}: sinks written when training"
        );
        Ok(())
    }

    #[test]
    fn equals_the_separate_ops() -> Result<()> {
        for act in [Activation::Silu, Activation::GeluTanh] {
            for (plus_one, trains, norm_trains) in [
                (false, true, true),
                (true, true, true),
                (false, false, false),
                (false, true, false),
            ] {
                check(act, plus_one, trains, norm_trains)?;
            }
        }
        Ok(())
    }

    #[test]
    fn an_unsupported_projection_is_left_to_the_caller() -> Result<()> {
        let rms = RmsNorm::new(Tensor::ones(8, DType::F32, &Device::Cpu)?, false, 1e-5)?;
        let mlp = Mlp {
            gate_up: Linear::new(Weight::dense(randn((6, 8), 1)?), None), // inference, not training
            down: linear(&randn((8, 3), 2)?, true),
        };
        assert!(mlp_block(&randn((4, 8), 3)?, &rms, &mlp, Activation::Silu)?.is_none());
        Ok(())
    }
}
