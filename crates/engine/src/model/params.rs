//! The decoder's parameters by name: the trainer's view (which tensors to train, which to freeze)
//! and the writer's view (Hugging Face tensor names, with fused q/k/v and gate/up split back
//! unless the family stores them fused, as Phi-3 does).

use crate::io::config::Family;
use crate::model::{Decoder, RmsNorm};
use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;

/// Which part of the model a parameter belongs to; freezing is decided per layer and module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    Embed,
    /// Everything under `self_attn` (projections, biases, q/k norms).
    Attn,
    /// Everything under `mlp`.
    Mlp,
    /// A layer's norms (outside `self_attn`/`mlp`, so SPPFT keeps them trainable).
    Norm,
    FinalNorm,
    LmHead,
}

#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Hugging Face name, except that q/k/v and gate/up are always fused here
    /// (`self_attn.qkv_proj`, `mlp.gate_up_proj`).
    pub name: String,
    pub layer: Option<usize>,
    pub module: Module,
}

fn info(name: String, layer: Option<usize>, module: Module) -> ParamInfo {
    ParamInfo {
        name,
        layer,
        module,
    }
}

/// Hugging Face names of a layer's norms, in the order attn_in, attn_out, mlp_in, mlp_out.
fn norm_names(sandwich: bool) -> [&'static str; 4] {
    if sandwich {
        [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
    } else {
        ["input_layernorm", "", "post_attention_layernorm", ""]
    }
}

impl Decoder {
    /// Every parameter tensor with its name and place, mutable (the trainer swaps them for
    /// variables). The order is fixed: embedding, layers bottom-up, final norm, lm_head.
    pub fn params_mut(&mut self) -> Vec<(ParamInfo, &mut Tensor)> {
        let sandwich = self.cfg.sandwich_norms;
        let mut out: Vec<(ParamInfo, &mut Tensor)> = vec![(
            info("model.embed_tokens.weight".into(), None, Module::Embed),
            &mut self.embed,
        )];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            let names = norm_names(sandwich);
            out.push((
                info(format!("{p}.{}.weight", names[0]), Some(l), Module::Norm),
                &mut layer.attn_in_norm.weight,
            ));
            out.push((
                info(
                    format!("{p}.self_attn.qkv_proj.weight"),
                    Some(l),
                    Module::Attn,
                ),
                &mut layer.attn.qkv.weight,
            ));
            if let Some(b) = layer.attn.qkv.bias.as_mut() {
                out.push((
                    info(
                        format!("{p}.self_attn.qkv_proj.bias"),
                        Some(l),
                        Module::Attn,
                    ),
                    b,
                ));
            }
            if let Some(n) = layer.attn.q_norm.as_mut() {
                out.push((
                    info(
                        format!("{p}.self_attn.q_norm.weight"),
                        Some(l),
                        Module::Attn,
                    ),
                    &mut n.weight,
                ));
            }
            if let Some(n) = layer.attn.k_norm.as_mut() {
                out.push((
                    info(
                        format!("{p}.self_attn.k_norm.weight"),
                        Some(l),
                        Module::Attn,
                    ),
                    &mut n.weight,
                ));
            }
            out.push((
                info(
                    format!("{p}.self_attn.o_proj.weight"),
                    Some(l),
                    Module::Attn,
                ),
                &mut layer.attn.o.weight,
            ));
            if let Some(b) = layer.attn.o.bias.as_mut() {
                out.push((
                    info(format!("{p}.self_attn.o_proj.bias"), Some(l), Module::Attn),
                    b,
                ));
            }
            if let Some(n) = layer.attn_out_norm.as_mut() {
                out.push((
                    info(format!("{p}.{}.weight", names[1]), Some(l), Module::Norm),
                    &mut n.weight,
                ));
            }
            out.push((
                info(format!("{p}.{}.weight", names[2]), Some(l), Module::Norm),
                &mut layer.mlp_in_norm.weight,
            ));
            out.push((
                info(format!("{p}.mlp.gate_up_proj.weight"), Some(l), Module::Mlp),
                &mut layer.mlp.gate_up.weight,
            ));
            if let Some(b) = layer.mlp.gate_up.bias.as_mut() {
                out.push((
                    info(format!("{p}.mlp.gate_up_proj.bias"), Some(l), Module::Mlp),
                    b,
                ));
            }
            out.push((
                info(format!("{p}.mlp.down_proj.weight"), Some(l), Module::Mlp),
                &mut layer.mlp.down.weight,
            ));
            if let Some(b) = layer.mlp.down.bias.as_mut() {
                out.push((
                    info(format!("{p}.mlp.down_proj.bias"), Some(l), Module::Mlp),
                    b,
                ));
            }
            if let Some(n) = layer.mlp_out_norm.as_mut() {
                out.push((
                    info(format!("{p}.{}.weight", names[3]), Some(l), Module::Norm),
                    &mut n.weight,
                ));
            }
        }
        out.push((
            info("model.norm.weight".into(), None, Module::FinalNorm),
            &mut self.final_norm.weight,
        ));
        if let Some(h) = self.lm_head.as_mut() {
            out.push((info("lm_head.weight".into(), None, Module::LmHead), h));
        }
        out
    }

    /// Names and places of every parameter, in `params_mut` order.
    pub fn param_infos(&mut self) -> Vec<ParamInfo> {
        self.params_mut().into_iter().map(|(i, _)| i).collect()
    }

    /// Marks the projections of `(layer, module)` pairs chosen by `frozen` as frozen linears.
    pub fn set_frozen_linears(&mut self, frozen: impl Fn(usize, Module) -> bool) {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for lin in [&mut layer.attn.qkv, &mut layer.attn.o] {
                lin.frozen = frozen(l, Module::Attn);
            }
            for lin in [&mut layer.mlp.gate_up, &mut layer.mlp.down] {
                lin.frozen = frozen(l, Module::Mlp);
            }
        }
    }

    /// Every tensor under its Hugging Face name, as a checkpoint of this family stores it.
    pub fn hf_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let cfg = &self.cfg;
        let fused = cfg.family == Family::Phi3;
        let (qd, kvd, i) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let mut out = BTreeMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.embed.clone());
        let names = norm_names(cfg.sandwich_norms);
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let mut put = |name: String, t: &Tensor| {
                out.insert(name, t.clone());
            };
            let norms: [Option<&RmsNorm>; 4] = [
                Some(&layer.attn_in_norm),
                layer.attn_out_norm.as_ref(),
                Some(&layer.mlp_in_norm),
                layer.mlp_out_norm.as_ref(),
            ];
            for (n, name) in norms.iter().zip(names) {
                if let Some(n) = n {
                    put(format!("{p}.{name}.weight"), &n.weight);
                }
            }
            let qkv = &layer.attn.qkv;
            if fused {
                put(format!("{p}.self_attn.qkv_proj.weight"), &qkv.weight);
                if let Some(b) = &qkv.bias {
                    put(format!("{p}.self_attn.qkv_proj.bias"), b);
                }
            } else {
                for (proj, start, len) in [
                    ("q_proj", 0, qd),
                    ("k_proj", qd, kvd),
                    ("v_proj", qd + kvd, kvd),
                ] {
                    put(
                        format!("{p}.self_attn.{proj}.weight"),
                        &qkv.weight.narrow(0, start, len)?,
                    );
                    if let Some(b) = &qkv.bias {
                        put(
                            format!("{p}.self_attn.{proj}.bias"),
                            &b.narrow(0, start, len)?,
                        );
                    }
                }
            }
            if let Some(n) = &layer.attn.q_norm {
                put(format!("{p}.self_attn.q_norm.weight"), &n.weight);
            }
            if let Some(n) = &layer.attn.k_norm {
                put(format!("{p}.self_attn.k_norm.weight"), &n.weight);
            }
            put(format!("{p}.self_attn.o_proj.weight"), &layer.attn.o.weight);
            if let Some(b) = &layer.attn.o.bias {
                put(format!("{p}.self_attn.o_proj.bias"), b);
            }
            let gu = &layer.mlp.gate_up;
            if fused {
                put(format!("{p}.mlp.gate_up_proj.weight"), &gu.weight);
            } else {
                for (proj, start) in [("gate_proj", 0), ("up_proj", i)] {
                    put(
                        format!("{p}.mlp.{proj}.weight"),
                        &gu.weight.narrow(0, start, i)?,
                    );
                    if let Some(b) = &gu.bias {
                        put(format!("{p}.mlp.{proj}.bias"), &b.narrow(0, start, i)?);
                    }
                }
            }
            put(format!("{p}.mlp.down_proj.weight"), &layer.mlp.down.weight);
            if let Some(b) = &layer.mlp.down.bias {
                put(format!("{p}.mlp.down_proj.bias"), b);
            }
        }
        out.insert(
            "model.norm.weight".to_string(),
            self.final_norm.weight.clone(),
        );
        if let Some(h) = &self.lm_head {
            out.insert("lm_head.weight".to_string(), h.clone());
        }
        Ok(out)
    }
}

/// The Hugging Face tensor names a fused internal name stands for (itself when not fused).
pub fn hf_names_of(internal: &str, family: Family) -> Vec<String> {
    if family == Family::Phi3 {
        return vec![internal.to_string()];
    }
    let split = |from: &str, to: &[&str]| -> Option<Vec<String>> {
        internal
            .contains(from)
            .then(|| to.iter().map(|t| internal.replace(from, t)).collect())
    };
    split("qkv_proj", &["q_proj", "k_proj", "v_proj"])
        .or_else(|| split("gate_up_proj", &["gate_proj", "up_proj"]))
        .unwrap_or_else(|| vec![internal.to_string()])
}
