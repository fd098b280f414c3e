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

/// What the paper's scaling multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleTarget {
    /// The attention and MLP weight matrices (the paper's intervention).
    #[default]
    Weights,
    /// Each layer's attention and MLP contributions to the residual stream, after any
    /// post-norm: the same "louder layer" on every family, where per-head q/k norms or
    /// post-norms cancel most of a weight scaling.
    Residual,
}

impl std::str::FromStr for ScaleTarget {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "weights" => Ok(ScaleTarget::Weights),
            "residual" => Ok(ScaleTarget::Residual),
            _ => bail!("--scale-target `{s}`: expected weights or residual"),
        }
    }
}

impl std::fmt::Display for ScaleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleTarget::Weights => "weights",
            ScaleTarget::Residual => "residual",
        })
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

    /// `scale_layers` on either target; for `Residual` the report lists no matrices (none is
    /// scaled: the layers' outputs are).
    pub fn scale_layers_with(
        &mut self,
        range: LayerRange,
        alpha: f64,
        target: ScaleTarget,
    ) -> Result<ScaleReport> {
        let mut rep = self.scale_layers(range, alpha)?;
        if target == ScaleTarget::Residual {
            self.restore_scaling();
            for l in range.layers() {
                self.layers[l].residual_scale = alpha;
            }
            rep.matrices.clear();
        }
        Ok(rep)
    }

    /// Puts every layer back to its unscaled weights and outputs.
    pub fn restore_scaling(&mut self) {
        for layer in &mut self.layers {
            layer.residual_scale = 1.0;
            for lin in layer.linears_mut() {
                lin.scale = 1.0;
            }
        }
    }

    /// What a weight scaling cannot do on this family, in plain words (empty where it acts as
    /// on Llama): normalisations after a scaled matrix divide the factor out again.
    pub fn weight_scaling_notes(&self) -> Vec<String> {
        let Some(layer) = self.layers.first() else {
            return vec![];
        };
        let mut notes = vec![];
        if layer.attn.q_norm.is_some() && layer.attn.k_norm.is_some() {
            notes.push(
                "per-head q/k norms cancel the scaling of q and k: the attention pattern does                  not sharpen"
                    .to_string(),
            );
        }
        if layer.attn_out_norm.is_some() {
            notes.push(
                "the post-attention norm cancels the scaling of v and o: the attention's                  contribution to the residual stream does not grow"
                    .to_string(),
            );
        }
        if layer.mlp_out_norm.is_some() {
            notes.push(
                "the post-feedforward norm cancels the scaling of down (and of up, which the                  gate multiplies): the MLP's contribution changes only through the gate's                  activation"
                    .to_string(),
            );
        }
        notes
    }
}
