//! The paper's intervention: multiply the attention and MLP weight matrices of a layer range by
//! alpha (norms and biases untouched). The factor is applied to each product, alpha·(W·x), before
//! the bias: the same as scaling W up to f32 rounding, exact for bf16 and quantized weights
//! (which scaling in place would round or re-quantize), free of weight copies, and undone
//! exactly by setting the factor back to 1.

use crate::model::layout::{LayerTensor, Layout, Part};
use crate::model::Decoder;
use anyhow::{bail, Result};

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

impl Decoder {
    /// Scales the range by `alpha` relative to the original weights (a previous scaling is
    /// undone first) and lists every matrix it scaled, one per projection as a checkpoint
    /// names them (the paper's code silently skipped o_proj; this list shows it is there).
    pub fn scale_layers(&mut self, range: LayerRange, alpha: f64) -> Result<ScaleReport> {
        if !alpha.is_finite() || alpha <= 0.0 {
            bail!("alpha must be a positive finite number, got {alpha}");
        }
        LayerRange::new(range.first, range.last, self.num_layers())?;
        self.restore_scaling();
        let table: Vec<LayerTensor> = Layout::split(&self.cfg)
            .layer_tensors()
            .into_iter()
            .filter(|t| t.slot.is_matrix() && t.part == Part::Weight)
            .collect();
        let mut matrices = Vec::new();
        for l in range.layers() {
            for lin in self.layers[l].linears_mut() {
                lin.scale = alpha;
            }
            matrices.extend(table.iter().map(|t| t.name(l)));
        }
        Ok(ScaleReport {
            range,
            alpha,
            matrices,
        })
    }

    /// Puts every layer back to its unscaled weights.
    pub fn restore_scaling(&mut self) {
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.scale = 1.0;
            }
        }
    }
}
