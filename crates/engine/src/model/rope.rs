//! Rotary position embeddings with the frequency schedules of transformers'
//! `modeling_rope_utils.py`, computed in f32 the way it computes them so angles agree bit-for-bit
//! in the common cases.

use crate::io::config::{RopeConfig, RopeScaling};
use anyhow::Result;
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct Rope {
    /// Dimensions rotated per head (the rest pass through: partial_rotary_factor).
    pub rot_dim: usize,
    inv_freq: Vec<f32>,
    /// longrope: frequencies used once the sequence is longer than `switch_after`.
    long_inv_freq: Option<(Vec<f32>, usize)>,
    /// Multiplies cos and sin (longrope's attention factor).
    scale: f32,
}

fn base_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| {
            let exponent = i as f32 / dim as f32;
            1.0f32 / (theta as f32).powf(exponent)
        })
        .collect()
}

impl Rope {
    pub fn new(cfg: &RopeConfig, rot_dim: usize) -> Rope {
        let mut inv = base_inv_freq(cfg.theta, rot_dim);
        let mut long = None;
        let mut scale = 1.0f32;
        match &cfg.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= *factor as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let factor = *factor as f32;
                let (low, high) = (*low_freq_factor as f32, *high_freq_factor as f32);
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    // transformers: ~(wavelen < high) * ~(wavelen > low); a NaN wavelength is
                    // neither, so it counts as medium there and here.
                    use std::cmp::Ordering::{Greater, Less};
                    let medium = wavelen.partial_cmp(&high_wavelen) != Some(Less)
                        && wavelen.partial_cmp(&low_wavelen) != Some(Greater);
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let with = |factors: &[f64]| -> Vec<f32> {
                    (0..rot_dim)
                        .step_by(2)
                        .zip(factors)
                        .map(|(i, &ext)| {
                            let exponent = i as f32 / rot_dim as f32;
                            1.0f32 / (ext as f32 * (cfg.theta as f32).powf(exponent))
                        })
                        .collect()
                };
                inv = with(short_factor);
                long = Some((with(long_factor), *original_max_position_embeddings));
                scale = *attention_factor as f32;
            }
        }
        Rope {
            rot_dim,
            inv_freq: inv,
            long_inv_freq: long,
            scale,
        }
    }

    /// cos and sin, each `[B, T, rot_dim/2]`, for per-row positions `positions[b][t]`.
    /// `seq_len` is the longest sequence the call covers (selects longrope's long factors).
    pub fn cos_sin(
        &self,
        positions: &[Vec<u32>],
        seq_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv = match &self.long_inv_freq {
            Some((long, switch)) if seq_len > *switch => long,
            _ => &self.inv_freq,
        };
        let b = positions.len();
        let t = positions.first().map(|p| p.len()).unwrap_or(0);
        let half = inv.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for &f in inv {
                    let a = p as f32 * f;
                    cos.push(a.cos() * self.scale);
                    sin.push(a.sin() * self.scale);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, t, half), device)?,
            Tensor::from_vec(sin, (b, t, half), device)?,
        ))
    }
}
/// Rotates `x: [B, H, T, D]` (rotate-half convention) on its first `rot_dim` dims. Inference
/// only (candle's rope has no backward; training uses `train::ops::rope`).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, rot_dim: usize) -> Result<Tensor> {
    let d = x.dim(3)?;
    if rot_dim == d {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    let rot = x.narrow(3, 0, rot_dim)?.contiguous()?;
    let rotated = candle_nn::rotary_emb::rope(&rot, cos, sin)?;
    Ok(Tensor::cat(
        &[&rotated, &x.narrow(3, rot_dim, d - rot_dim)?],
        3,
    )?)
}
