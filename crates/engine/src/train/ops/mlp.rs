//! A layer's whole MLP block as one op: `y = x + down(act(gate) · up)` with `gate, up` the
//! projection of `rmsnorm(x)`. Composed of the separate ops (norm, linear, gated, linear, add),
//! candle's backward gives each of the four intermediates a zeroed gradient buffer and an add
//! into it, on one thread while the other waits: about 10 MB of memset and 20 MB of adds per
//! layer and step for SmolLM2 at batch 4 x 128. Here backward runs the same kernels in order
//! and hands candle the two gradients it tracks (the input's, and the norm weight's when it
//! trains); the projections' weight gradients go to their sinks, as the linear op's do.

use super::block::{add_into, packed_rows, PreNorm, Proj};
use super::{act, cpu_f32, f32_slice};
use crate::io::config::Activation;
use crate::model::layers::Mlp;
use crate::model::RmsNorm;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::sync::Mutex;

/// What the forward pass keeps for backward (the input itself candle keeps).
struct Saved {
    /// The normed input `[N, H]`, its rows' 1/rms, the projection `[N, 2I]`, and the gated
    /// activation `[N, I]`.
    h: Vec<f32>,
    inv: Vec<f32>,
    gate_up: Vec<f32>,
    gated: Vec<f32>,
}

struct MlpBlock {
    norm: PreNorm,
    act: Activation,
    gate_up: Proj,
    down: Proj,
    saved: Mutex<Option<Saved>>,
}

impl CustomOp2 for MlpBlock {
    fn name(&self) -> &'static str {
        "mlp-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, hid) = xl.shape().dims2()?;
        let (two_i, gu_in) = self.gate_up.dims()?;
        let (d_out, d_in) = self.down.dims()?;
        if gu_in != hid || d_out != hid || two_i != 2 * d_in || wl.dims() != [hid] {
            candle_core::bail!(
                "mlp block: input [{n}, {hid}], norm {:?}, gate_up [{two_i}, {gu_in}], down \
                 [{d_out}, {d_in}]",
                wl.dims()
            );
        }
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let (h, inv) = self.norm.forward(x, w, n, hid);
        let gate_up = self.gate_up.forward(&h, n)?;
        let gated = act::forward(&gate_up, &packed_rows(n, two_i), self.act, false);
        let mut y = self.down.forward(&gated, n)?;
        add_into(&mut y, x);
        *self.saved.lock().unwrap() = Some(Saved {
            h,
            inv,
            gate_up,
            gated,
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().unwrap();
        let saved = guard
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("mlp block: backward before forward".into()))?;
        let n = x.dims2()?.0;
        let two_i = self.gate_up.dims()?.0;
        let dy = dy.contiguous()?;
        let (dy_s, dy_l) = dy.storage_and_layout();
        let dy = cpu_f32(&dy_s, dy_l)?;
        let d_gated = self.down.backward(dy, &saved.gated, n)?;
        let (gu_rows, g_rows) = (packed_rows(n, two_i), packed_rows(n, two_i / 2));
        let d_gate_up = act::backward(&saved.gate_up, &gu_rows, &d_gated, &g_rows, self.act);
        drop(d_gated);
        let dh = self.gate_up.backward(&d_gate_up, &saved.h, n)?;
        drop(d_gate_up);
        self.norm.backward(x, w, &dh, dy, &saved.inv)
    }
}

/// `x + down(act(gate) · up)` of `gate_up(norm(x))` for the packed rows `x: [N, H]`, as one
/// op; `None` when a projection is not one the op runs (the caller composes the block then).
pub fn mlp_block(x: &Tensor, norm: &RmsNorm, mlp: &Mlp, act: Activation) -> Result<Option<Tensor>> {
    let (Some(gate_up), Some(down)) = (Proj::of(&mlp.gate_up), Proj::of(&mlp.down)) else {
        return Ok(None);
    };
    let op = MlpBlock {
        norm: PreNorm::of(norm),
        act,
        gate_up,
        down,
        saved: Mutex::new(None),
    };
    Ok(Some(
        x.contiguous()?.apply_op2(&norm.weight.contiguous()?, op)?,
    ))
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
