//! The decoder's parameters by name: the trainer's view (which tensors to train, which to freeze)
//! and the writer's view (Hugging Face tensor names, with fused q/k/v and gate/up split back
//! unless the family stores them fused, as Phi-3 does).

use crate::model::layout::{Layout, Part, Slot, EMBED, FINAL_NORM, LM_HEAD};
use crate::model::weight::Weight;
use crate::model::{Decoder, Layer, Linear, LinearGrad};
use anyhow::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;

pub use crate::model::layout::{hf_names_of, Module};

#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Hugging Face name, except that q/k/v and gate/up are always fused here
    /// (`self_attn.qkv_proj`, `mlp.gate_up_proj`).
    pub name: String,
    pub layer: Option<usize>,
    pub module: Module,
    /// The projection this is the weight matrix of (not its bias), if any.
    pub matrix: Option<Slot>,
}

/// A layer's tensors by slot, in the trainer's fixed order (the order of its optimizer state).
/// Fails on quantized weights (they have no tensor to train or edit).
fn slots_mut(layer: &mut Layer) -> Result<Vec<(Slot, Part, &mut Tensor)>> {
    fn norm<'a>(
        out: &mut Vec<(Slot, Part, &'a mut Tensor)>,
        slot: Slot,
        t: Option<&'a mut Tensor>,
    ) {
        if let Some(t) = t {
            out.push((slot, Part::Weight, t));
        }
    }
    let mut out = vec![];
    let Layer {
        attn_in_norm,
        attn,
        attn_out_norm,
        mlp_in_norm,
        mlp,
        mlp_out_norm,
        ..
    } = layer;
    norm(&mut out, Slot::AttnInNorm, Some(&mut attn_in_norm.weight));
    out.push((Slot::Qkv, Part::Weight, attn.qkv.weight.tensor_mut()?));
    if let Some(b) = attn.qkv.bias.as_mut() {
        out.push((Slot::Qkv, Part::Bias, b));
    }
    norm(
        &mut out,
        Slot::QNorm,
        attn.q_norm.as_mut().map(|n| &mut n.weight),
    );
    norm(
        &mut out,
        Slot::KNorm,
        attn.k_norm.as_mut().map(|n| &mut n.weight),
    );
    out.push((Slot::O, Part::Weight, attn.o.weight.tensor_mut()?));
    if let Some(b) = attn.o.bias.as_mut() {
        out.push((Slot::O, Part::Bias, b));
    }
    norm(
        &mut out,
        Slot::AttnOutNorm,
        attn_out_norm.as_mut().map(|n| &mut n.weight),
    );
    norm(&mut out, Slot::MlpInNorm, Some(&mut mlp_in_norm.weight));
    out.push((Slot::GateUp, Part::Weight, mlp.gate_up.weight.tensor_mut()?));
    if let Some(b) = mlp.gate_up.bias.as_mut() {
        out.push((Slot::GateUp, Part::Bias, b));
    }
    out.push((Slot::Down, Part::Weight, mlp.down.weight.tensor_mut()?));
    if let Some(b) = mlp.down.bias.as_mut() {
        out.push((Slot::Down, Part::Bias, b));
    }
    norm(
        &mut out,
        Slot::MlpOutNorm,
        mlp_out_norm.as_mut().map(|n| &mut n.weight),
    );
    Ok(out)
}

impl Decoder {
    /// Every parameter tensor with its name and place, mutable (the trainer swaps them for
    /// variables). The order is fixed: embedding, layers bottom-up, final norm, lm_head.
    /// Fails when weights are quantized.
    pub fn params_mut(&mut self) -> Result<Vec<(ParamInfo, &mut Tensor)>> {
        let fused = Layout::fused(&self.cfg);
        let top = |name: &str, module| ParamInfo {
            name: name.to_string(),
            layer: None,
            module,
            matrix: None,
        };
        let mut out: Vec<(ParamInfo, &mut Tensor)> =
            vec![(top(EMBED, Module::Embed), self.embed.tensor_mut()?)];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (slot, part, t) in slots_mut(layer)? {
                let info = ParamInfo {
                    name: fused.slot_name(l, slot, part),
                    layer: Some(l),
                    module: slot.module(),
                    matrix: (slot.is_matrix() && part == Part::Weight).then_some(slot),
                };
                out.push((info, t));
            }
        }
        out.push((
            top(FINAL_NORM, Module::FinalNorm),
            &mut self.final_norm.weight,
        ));
        if let Some(h) = self.lm_head.as_mut() {
            out.push((top(LM_HEAD, Module::LmHead), h.tensor_mut()?));
        }
        Ok(out)
    }

    /// Names and places of every parameter, in `params_mut` order.
    pub fn param_infos(&mut self) -> Result<Vec<ParamInfo>> {
        Ok(self.params_mut()?.into_iter().map(|(i, _)| i).collect())
    }

    /// Each layer's four projections with their slots.
    fn projections_mut(&mut self) -> impl Iterator<Item = (usize, Slot, &mut Linear)> {
        self.layers.iter_mut().enumerate().flat_map(|(l, layer)| {
            let Layer { attn, mlp, .. } = layer;
            [
                (l, Slot::Qkv, &mut attn.qkv),
                (l, Slot::O, &mut attn.o),
                (l, Slot::GateUp, &mut mlp.gate_up),
                (l, Slot::Down, &mut mlp.down),
            ]
        })
    }

    /// The arithmetic of every layer projection's training products.
    pub fn set_train_precision(&mut self, precision: crate::kernels::gemm::Precision) {
        for (_, _, lin) in self.projections_mut() {
            lin.precision = precision;
        }
    }

    /// Sets how the training pass treats each layer's projections (q/k/v and o are the
    /// attention module's, gate/up and down the MLP's).
    pub fn set_linear_grads(&mut self, mut grad: impl FnMut(usize, Slot) -> LinearGrad) {
        for (l, slot, lin) in self.projections_mut() {
            lin.grad = grad(l, slot);
        }
    }

    /// Every tensor under its Hugging Face name, as a checkpoint of this family stores it (the
    /// fused slots cut back into the table's pieces); dense weights as held, quantized ones
    /// dequantized to f32.
    pub fn hf_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let table = Layout::stored(&self.cfg).layer_tensors();
        let mut out = BTreeMap::new();
        out.insert(EMBED.to_string(), dense_or_f32(&self.embed)?);
        for (l, layer) in self.layers.iter().enumerate() {
            for t in &table {
                let Some(whole) = slot_tensor(layer, t.slot, t.part)? else {
                    continue;
                };
                let piece = if t.rows.start == 0 && t.rows.end == whole.dim(0)? {
                    whole.clone()
                } else {
                    whole.narrow(0, t.rows.start, t.rows.len())?
                };
                out.insert(t.name(l), piece);
            }
        }
        out.insert(FINAL_NORM.to_string(), self.final_norm.weight.clone());
        if let Some(h) = &self.lm_head {
            out.insert(LM_HEAD.to_string(), dense_or_f32(h)?);
        }
        Ok(out)
    }
}

fn dense_or_f32(w: &Weight) -> Result<Tensor> {
    match w.as_dense() {
        Some(t) => Ok(t.clone()),
        None => w.to_f32(),
    }
}

/// The tensor a layer holds in `slot` (None when the layer has no such norm or bias); quantized
/// weights dequantized to f32.
pub(crate) fn slot_tensor(layer: &Layer, slot: Slot, part: Part) -> Result<Option<Tensor>> {
    let linear = match slot {
        Slot::Qkv => &layer.attn.qkv,
        Slot::O => &layer.attn.o,
        Slot::GateUp => &layer.mlp.gate_up,
        Slot::Down => &layer.mlp.down,
        _ => {
            let norm = match slot {
                Slot::QNorm => layer.attn.q_norm.as_ref(),
                Slot::KNorm => layer.attn.k_norm.as_ref(),
                Slot::AttnInNorm => Some(&layer.attn_in_norm),
                Slot::AttnOutNorm => layer.attn_out_norm.as_ref(),
                Slot::MlpInNorm => Some(&layer.mlp_in_norm),
                _ => layer.mlp_out_norm.as_ref(),
            };
            return Ok(norm
                .filter(|_| part == Part::Weight)
                .map(|n| n.weight.clone()));
        }
    };
    Ok(match part {
        Part::Weight => Some(dense_or_f32(&linear.weight)?),
        Part::Bias => linear.bias.clone(),
    })
}
