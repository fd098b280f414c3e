//! The freeze rule, used by `finetune` (which parameters get no gradient) and by `export` (which
//! Hugging Face names other trainers freeze): in layers `first..=last`, every parameter of the
//! named modules is frozen — under `self_attn` the projections, their biases and Qwen3/Gemma3's
//! q/k norms, under `mlp` the projections and biases. The layers' own norms, the embeddings, the
//! final norm and lm_head stay trainable. Also the freeze audit of a finished run.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Value};
use sl_engine::io::config::{Family, ModelConfig};
use sl_engine::model::layout::{hf_names_of, Layout, Module};
use sl_engine::train::trainer::Trainer;
use sl_engine::LayerRange;
use std::collections::{BTreeMap, HashSet};

/// A part of a decoder layer that can be frozen, named as in `--freeze-modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeModule {
    Attn,
    Mlp,
}

impl FreezeModule {
    /// The one parser of `--freeze-modules`: known names, deduplicated, in a fixed order.
    pub fn parse_list(items: &[String]) -> Result<Vec<FreezeModule>> {
        let mut out = Vec::new();
        for s in items {
            let m = match s.trim() {
                "attn" => FreezeModule::Attn,
                "mlp" => FreezeModule::Mlp,
                other => bail!("unknown --freeze-modules entry `{other}` (expected attn, mlp)"),
            };
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            bail!("--freeze-modules is empty: name attn, mlp or both");
        }
        out.sort();
        Ok(out)
    }

    /// The decoder's module this names.
    pub fn module(self) -> Module {
        match self {
            FreezeModule::Attn => Module::Attn,
            FreezeModule::Mlp => Module::Mlp,
        }
    }

    /// The submodule's attribute name inside a transformers decoder layer.
    pub fn hf_module(self) -> &'static str {
        self.module()
            .hf_prefix()
            .expect("attn and mlp have a prefix")
    }
}

/// What to freeze, checked against the model's shape.
#[derive(Debug, Clone, Serialize)]
pub struct FreezePlan {
    pub family: Family,
    pub architecture: String,
    pub num_layers: usize,
    pub range: LayerRange,
    pub modules: Vec<FreezeModule>,
    /// The model's tensors as its checkpoints name them.
    #[serde(skip)]
    pub layout: Layout,
}

impl FreezePlan {
    pub fn new(
        cfg: &ModelConfig,
        range: LayerRange,
        modules: Vec<FreezeModule>,
    ) -> Result<FreezePlan> {
        if cfg.num_layers == 0 {
            bail!("the model config has no layers (num_hidden_layers = 0)");
        }
        // Re-check here so a range built elsewhere cannot slip past the model's bounds.
        let range = LayerRange::new(range.first, range.last, cfg.num_layers)?;
        if modules.is_empty() {
            bail!("nothing to freeze: no module named");
        }
        Ok(FreezePlan {
            family: cfg.family,
            architecture: cfg.architecture.clone(),
            num_layers: cfg.num_layers,
            range,
            modules,
            layout: Layout::stored(cfg),
        })
    }

    pub fn freezes(&self, m: FreezeModule) -> bool {
        self.modules.contains(&m)
    }

    /// The rule itself, on a parameter given by its layer (None outside the layers) and module.
    pub fn freezes_param(&self, layer: Option<usize>, module: Module) -> bool {
        layer.is_some_and(|l| self.range.layers().contains(&l))
            && self.modules.iter().any(|m| m.module() == module)
    }

    /// The rule on a Hugging Face parameter name (the layout table gives its layer and module).
    pub fn is_frozen(&self, name: &str) -> bool {
        self.layout
            .find(name)
            .is_some_and(|(l, t)| self.freezes_param(Some(l), t.module))
    }

    /// The linear layers of a submodule as transformers names them for this model (the names a
    /// LoRA config targets). Phi-3 stores q/k/v and gate/up fused.
    pub fn projections(&self, m: FreezeModule) -> Vec<&'static str> {
        self.layout.projections(m.module())
    }

    /// (frozen, trainable) names of the model, in registration order.
    pub fn split(&self) -> (Vec<String>, Vec<String>) {
        self.layout
            .hf_names()
            .into_iter()
            .partition(|n| self.is_frozen(n))
    }

    pub fn outside_layers(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|l| !self.range.layers().contains(l))
            .collect()
    }
}

/// sha256 of the values as f32 little-endian bytes, fed in slices (a whole byte copy of every
/// tensor cost as much as the hash).
fn sha_of(t: &Tensor) -> Result<String> {
    use sha2::Digest;
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut hasher = sha2::Sha256::new();
    let mut bytes = Vec::with_capacity(4 * 4096);
    for chunk in v.chunks(4096) {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        hasher.update(&bytes);
    }
    Ok(crate::hex(&hasher.finalize()))
}

/// The hash of every tensor under its Hugging Face name (the audit's "before" and "after"),
/// the tensors hashed in parallel.
pub fn tensor_hashes(tensors: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, String>> {
    use rayon::prelude::*;
    let named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named
        .par_iter()
        .map(|(n, t)| Ok(((*n).clone(), sha_of(t)?)))
        .collect()
}

/// For every Hugging Face tensor: frozen or not, and the hash of its values before and after.
/// Fails if a frozen tensor changed.
pub fn freeze_audit(
    trainer: &Trainer,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, Tensor>,
) -> Result<Value> {
    let cfg = &trainer.decoder.cfg;
    let frozen: HashSet<String> = trainer
        .frozen
        .iter()
        .flat_map(|i| hf_names_of(&i.name, cfg))
        .collect();
    let mut rows = vec![];
    let (mut all_identical, mut frozen_params) = (true, 0usize);
    let after_hashes = tensor_hashes(after)?;
    for (name, t) in after {
        let is_frozen = frozen.contains(name);
        let h_after = after_hashes[name].clone();
        let h_before = before.get(name).cloned().unwrap_or_default();
        let identical = h_after == h_before;
        if is_frozen {
            frozen_params += t.elem_count();
            if !identical {
                all_identical = false;
            }
        }
        rows.push(
            json!({"name": name, "frozen": is_frozen, "sha256_before": h_before,
                         "sha256_after": h_after, "identical": identical}),
        );
    }
    if !all_identical {
        bail!("freeze audit failed: a frozen tensor changed during training (this is a bug)");
    }
    Ok(json!({
        "hash": "sha256 of the tensor's float32 little-endian values, in Hugging Face layout",
        "frozen_tensors": frozen.len(),
        "frozen_parameters": frozen_params,
        "all_frozen_identical": all_identical,
        "tensors": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The sliced hash is the hash of the whole byte string (the audit's stated definition), over
    /// a length that leaves a partial last slice, for every tensor of a map hashed in parallel.
    #[test]
    fn hashes_are_the_sha256_of_the_f32_little_endian_bytes() -> Result<()> {
        let mut map = BTreeMap::new();
        for (i, n) in [1usize, 4096, 10_001].into_iter().enumerate() {
            let v: Vec<f32> = (0..n).map(|j| (j as f32 * 0.37 + i as f32).sin()).collect();
            map.insert(format!("t{i}"), Tensor::from_vec(v, n, &Device::Cpu)?);
        }
        let got = tensor_hashes(&map)?;
        for (name, t) in &map {
            let v: Vec<f32> = t.to_vec1()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(got[name], crate::sha256_hex(&bytes), "{name}");
        }
        Ok(())
    }
}
