//! The paper's intervention: multiply the attention and MLP weight matrices of a layer range by
//! alpha (norms and biases untouched), and undo it exactly by restoring the saved originals.

use crate::model::layout::{LayerTensor, Layout, Part, Slot};
use crate::model::params::slot_tensor;
use crate::model::Decoder;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// A 0-indexed inclusive layer range, as the paper writes `[i, j]`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LayerRange {
    pub first: usize,
    pub last: usize,
}

impl LayerRange {
    pub fn new(first: usize, last: usize, num_layers: usize) -> Result<Self> {
        if first > last {
            bail!("layer range {first}-{last}: the first layer is after the last");
        }
        if num_layers == 0 {
            bail!("layer range {first}-{last}: the model has no layers");
        }
        if last >= num_layers {
            bail!(
                "layer range {first}-{last} is outside the model's layers 0-{}",
                num_layers - 1
            );
        }
        Ok(LayerRange { first, last })
    }

    /// Parses `I-J` (or a single layer `I`).
    pub fn parse(s: &str, num_layers: usize) -> Result<Self> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let p = |x: &str| -> Result<usize> {
            x.trim().parse().map_err(|_| {
                anyhow::anyhow!("layer range `{s}`: `{x}` is not a layer number (expected I-J)")
            })
        };
        LayerRange::new(p(a)?, p(b)?, num_layers)
    }

    pub fn layers(&self) -> std::ops::RangeInclusive<usize> {
        self.first..=self.last
    }

    pub fn len(&self) -> usize {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Display for LayerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Which matrices a scaling touched, by their Hugging Face names.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleReport {
    pub range: LayerRange,
    pub alpha: f64,
    pub matrices: Vec<String>,
}

/// The slots saved per scaled layer, in `Decoder::saved`'s order.
const SAVED: [Slot; 4] = [Slot::Qkv, Slot::O, Slot::GateUp, Slot::Down];

fn changed(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.ne(b)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        > 0.0)
}

impl Decoder {
    /// Scales the range by `alpha` relative to the original weights (a previous scaling is
    /// undone first), then checks that every targeted matrix really changed.
    pub fn scale_layers(&mut self, range: LayerRange, alpha: f64) -> Result<ScaleReport> {
        if !alpha.is_finite() || alpha <= 0.0 {
            bail!("alpha must be a positive finite number, got {alpha}");
        }
        LayerRange::new(range.first, range.last, self.num_layers())?;
        self.restore_scaling();
        let mut matrices = Vec::new();
        // Each matrix as a checkpoint names it, one per projection even where the family stores
        // them fused (the paper's code silently skipped o_proj; this check would not).
        let table: Vec<LayerTensor> = Layout::split(&self.cfg)
            .layer_tensors()
            .into_iter()
            .filter(|t| t.slot.is_matrix() && t.part == Part::Weight)
            .collect();
        for l in range.layers() {
            let layer = &mut self.layers[l];
            let orig = [
                layer.attn.qkv.weight.clone(),
                layer.attn.o.weight.clone(),
                layer.mlp.gate_up.weight.clone(),
                layer.mlp.down.weight.clone(),
            ];
            layer.attn.qkv.weight = (&orig[0] * alpha)?;
            layer.attn.o.weight = (&orig[1] * alpha)?;
            layer.mlp.gate_up.weight = (&orig[2] * alpha)?;
            layer.mlp.down.weight = (&orig[3] * alpha)?;
            for t in &table {
                let k = SAVED
                    .iter()
                    .position(|s| *s == t.slot)
                    .expect("a matrix slot");
                let after =
                    slot_tensor(layer, t.slot, Part::Weight).expect("matrices always exist");
                let (start, len) = (t.rows.start, t.rows.len());
                if alpha != 1.0
                    && !changed(
                        &orig[k].narrow(0, start, len)?,
                        &after.narrow(0, start, len)?,
                    )?
                {
                    bail!(
                        "scaling model.layers.{l}.{} by {alpha} left it unchanged \
                         (all-zero weights?)",
                        t.suffix
                    );
                }
                matrices.push(t.name(l));
            }
            self.saved.push((l, orig));
        }
        Ok(ScaleReport {
            range,
            alpha,
            matrices,
        })
    }

    /// Puts back the exact original weights of any scaled layers.
    pub fn restore_scaling(&mut self) {
        for (l, [qkv, o, gu, d]) in self.saved.drain(..) {
            let layer = &mut self.layers[l];
            layer.attn.qkv.weight = qkv;
            layer.attn.o.weight = o;
            layer.mlp.gate_up.weight = gu;
            layer.mlp.down.weight = d;
        }
    }
}
