//! The Hugging Face tensor layout of a decoder, in one table: for every tensor of a layer its name,
//! its shape, where it lives in our decoder (which fused slot, which rows of it) and which module
//! it belongs to; plus the tensors outside the layers. Loading, saving, scaling, the freeze rule,
//! the export plan and the GGUF name mapping all read names from here, so a family's layout is
//! written down once.

use crate::io::config::{Family, ModelConfig};
use serde::Serialize;
use std::ops::Range;

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

impl Module {
    /// The submodule's attribute name inside a transformers decoder layer, for the two that have
    /// one.
    pub fn hf_prefix(self) -> Option<&'static str> {
        match self {
            Module::Attn => Some("self_attn"),
            Module::Mlp => Some("mlp"),
            _ => None,
        }
    }
}

/// Where a layer tensor lives in our decoder: q/k/v and gate/up are held fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Qkv,
    O,
    GateUp,
    Down,
    QNorm,
    KNorm,
    /// `input_layernorm`.
    AttnInNorm,
    /// Gemma2/3's norm of the attention output.
    AttnOutNorm,
    /// The pre-MLP norm.
    MlpInNorm,
    /// Gemma2/3's norm of the MLP output.
    MlpOutNorm,
}

impl Slot {
    /// The four weight matrices the paper's scaling multiplies.
    pub fn is_matrix(self) -> bool {
        matches!(self, Slot::Qkv | Slot::O | Slot::GateUp | Slot::Down)
    }

    pub fn module(self) -> Module {
        match self {
            Slot::Qkv | Slot::O | Slot::QNorm | Slot::KNorm => Module::Attn,
            Slot::GateUp | Slot::Down => Module::Mlp,
            _ => Module::Norm,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Weight,
    Bias,
}

impl Part {
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Bias => "bias",
        }
    }

    pub fn parse(s: &str) -> Option<Part> {
        match s {
            "weight" => Some(Part::Weight),
            "bias" => Some(Part::Bias),
            _ => None,
        }
    }
}

/// One tensor of every decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTensor {
    /// Hugging Face name inside the layer, without `.weight`/`.bias` (`self_attn.q_proj`).
    pub suffix: &'static str,
    pub part: Part,
    pub slot: Slot,
    /// Index of this piece in its slot (q, k, v = 0, 1, 2; gate, up = 0, 1; 0 when whole).
    pub piece: usize,
    /// Its rows (first dimension) inside the slot's tensor.
    pub rows: Range<usize>,
    /// The shape the config implies.
    pub shape: Vec<usize>,
    /// The config fields behind `shape`, for the shape-check message.
    pub why: &'static str,
    pub module: Module,
}

impl LayerTensor {
    pub fn name(&self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.suffix,
            self.part.as_str()
        )
    }
}

/// One tensor outside the layers.
#[derive(Debug, Clone, PartialEq)]
pub struct TopTensor {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub why: &'static str,
    pub module: Module,
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The table for one config and one storage of q/k/v and gate/up (fused or one tensor each).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub family: Family,
    pub num_layers: usize,
    pub fused_qkv: bool,
    pub fused_gate_up: bool,
    pub tied: bool,
    vocab: usize,
    hidden: usize,
    inter: usize,
    q_dim: usize,
    kv_dim: usize,
    head_dim: usize,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    qk_norm: bool,
    sandwich: bool,
}

/// A projection's table rows: suffix, slot, piece, rows in the slot, input columns.
struct Proj(&'static str, Slot, usize, Range<usize>, usize);

impl Proj {
    /// Its weight and, when `bias` names the bias's shape reason, its bias.
    fn push(self, out: &mut Vec<LayerTensor>, why: &'static str, bias: Option<&'static str>) {
        let Proj(suffix, slot, piece, rows, cols) = self;
        let n = rows.len();
        let entry = |part, shape, why| LayerTensor {
            suffix,
            part,
            slot,
            piece,
            rows: rows.clone(),
            shape,
            why,
            module: slot.module(),
        };
        out.push(entry(Part::Weight, vec![n, cols], why));
        if let Some(bias_why) = bias {
            out.push(entry(Part::Bias, vec![n], bias_why));
        }
    }
}

impl Layout {
    /// As a checkpoint of this family stores it: Phi-3 keeps q/k/v and gate/up fused.
    pub fn stored(cfg: &ModelConfig) -> Layout {
        let fused = cfg.family == Family::Phi3;
        Layout::with_storage(cfg, fused, fused)
    }

    /// Our decoder's own view, q/k/v and gate/up fused for every family (the trainer's names).
    pub fn fused(cfg: &ModelConfig) -> Layout {
        Layout::with_storage(cfg, true, true)
    }

    /// One tensor per projection for every family.
    pub fn split(cfg: &ModelConfig) -> Layout {
        Layout::with_storage(cfg, false, false)
    }

    pub fn with_storage(cfg: &ModelConfig, fused_qkv: bool, fused_gate_up: bool) -> Layout {
        Layout {
            family: cfg.family,
            num_layers: cfg.num_layers,
            fused_qkv,
            fused_gate_up,
            tied: cfg.tie_word_embeddings,
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            inter: cfg.intermediate_size,
            q_dim: cfg.q_dim(),
            kv_dim: cfg.kv_dim(),
            head_dim: cfg.head_dim,
            qkv_bias: cfg.qkv_bias,
            o_bias: cfg.o_bias,
            mlp_bias: cfg.mlp_bias,
            qk_norm: cfg.qk_norm,
            sandwich: cfg.sandwich_norms,
        }
    }

    /// The fused name of a slot inside a layer (what our decoder calls it).
    pub fn slot_suffix(&self, slot: Slot) -> &'static str {
        match slot {
            Slot::Qkv => "self_attn.qkv_proj",
            Slot::O => "self_attn.o_proj",
            Slot::GateUp => "mlp.gate_up_proj",
            Slot::Down => "mlp.down_proj",
            Slot::QNorm => "self_attn.q_norm",
            Slot::KNorm => "self_attn.k_norm",
            Slot::AttnInNorm => "input_layernorm",
            Slot::AttnOutNorm => "post_attention_layernorm",
            Slot::MlpInNorm if self.sandwich => "pre_feedforward_layernorm",
            Slot::MlpInNorm => "post_attention_layernorm",
            Slot::MlpOutNorm => "post_feedforward_layernorm",
        }
    }

    /// `model.layers.{layer}.<slot's fused name>.<part>`.
    pub fn slot_name(&self, layer: usize, slot: Slot, part: Part) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.slot_suffix(slot),
            part.as_str()
        )
    }

    /// Every tensor of one layer, in transformers' registration order (self_attn, mlp, norms;
    /// weight before bias).
    pub fn layer_tensors(&self) -> Vec<LayerTensor> {
        let (h, i, qd, kvd) = (self.hidden, self.inter, self.q_dim, self.kv_dim);
        let mut out = Vec::new();
        let qkv_why = "(num_attention_heads + 2 num_key_value_heads) x head_dim, hidden_size";
        let qkv_b = |why| self.qkv_bias.then_some(why);
        if self.fused_qkv {
            let p = Proj("self_attn.qkv_proj", Slot::Qkv, 0, 0..qd + 2 * kvd, h);
            p.push(&mut out, qkv_why, qkv_b(qkv_why));
        } else {
            let (q_why, kv_why) = (
                "num_attention_heads x head_dim, hidden_size",
                "num_key_value_heads x head_dim, hidden_size",
            );
            let p = Proj("self_attn.q_proj", Slot::Qkv, 0, 0..qd, h);
            p.push(&mut out, q_why, qkv_b("q bias"));
            let p = Proj("self_attn.k_proj", Slot::Qkv, 1, qd..qd + kvd, h);
            p.push(&mut out, kv_why, qkv_b("k bias"));
            let p = Proj("self_attn.v_proj", Slot::Qkv, 2, qd + kvd..qd + 2 * kvd, h);
            p.push(&mut out, kv_why, qkv_b("v bias"));
        }
        let o_why = "hidden_size, num_attention_heads x head_dim";
        Proj("self_attn.o_proj", Slot::O, 0, 0..h, qd).push(
            &mut out,
            o_why,
            self.o_bias.then_some("o bias"),
        );
        if self.qk_norm {
            out.push(self.norm(Slot::QNorm, self.head_dim));
            out.push(self.norm(Slot::KNorm, self.head_dim));
        }
        let mlp_b = |why| self.mlp_bias.then_some(why);
        if self.fused_gate_up {
            let why = "2 x intermediate_size, hidden_size";
            let p = Proj("mlp.gate_up_proj", Slot::GateUp, 0, 0..2 * i, h);
            p.push(&mut out, why, mlp_b("gate_up bias"));
        } else {
            let why = "intermediate_size, hidden_size";
            let p = Proj("mlp.gate_proj", Slot::GateUp, 0, 0..i, h);
            p.push(&mut out, why, mlp_b("gate bias"));
            let p = Proj("mlp.up_proj", Slot::GateUp, 1, i..2 * i, h);
            p.push(&mut out, why, mlp_b("up bias"));
        }
        let down_why = "hidden_size, intermediate_size";
        let p = Proj("mlp.down_proj", Slot::Down, 0, 0..h, i);
        p.push(&mut out, down_why, mlp_b("down bias"));
        out.push(self.norm(Slot::AttnInNorm, h));
        if self.sandwich {
            out.push(self.norm(Slot::AttnOutNorm, h));
        }
        out.push(self.norm(Slot::MlpInNorm, h));
        if self.sandwich {
            out.push(self.norm(Slot::MlpOutNorm, h));
        }
        out
    }

    fn norm(&self, slot: Slot, n: usize) -> LayerTensor {
        LayerTensor {
            suffix: self.slot_suffix(slot),
            part: Part::Weight,
            slot,
            piece: 0,
            rows: 0..n,
            shape: vec![n],
            why: "norm size",
            module: slot.module(),
        }
    }

    pub fn embed(&self) -> TopTensor {
        TopTensor {
            name: EMBED,
            shape: vec![self.vocab, self.hidden],
            why: "vocab_size x hidden_size",
            module: Module::Embed,
        }
    }

    pub fn final_norm(&self) -> TopTensor {
        TopTensor {
            name: FINAL_NORM,
            shape: vec![self.hidden],
            why: "norm size",
            module: Module::FinalNorm,
        }
    }

    /// The output head; a tied checkpoint may still carry a copy, which must match the
    /// embedding's shape.
    pub fn lm_head(&self) -> TopTensor {
        TopTensor {
            name: LM_HEAD,
            shape: vec![self.vocab, self.hidden],
            why: if self.tied {
                "vocab_size x hidden_size"
            } else {
                "vocab_size x hidden_size (tie_word_embeddings is false)"
            },
            module: Module::LmHead,
        }
    }

    /// Every parameter name `model.named_parameters()` yields, in transformers' registration
    /// order. A tied lm_head is the embedding's tensor and is listed once, as transformers does.
    pub fn hf_names(&self) -> Vec<String> {
        let table = self.layer_tensors();
        let mut names = vec![EMBED.to_string()];
        for l in 0..self.num_layers {
            names.extend(table.iter().map(|t| t.name(l)));
        }
        names.push(FINAL_NORM.to_string());
        if !self.tied {
            names.push(LM_HEAD.to_string());
        }
        names
    }

    /// The table entry of a Hugging Face name with its layer; None for names outside the layers
    /// or not in this layout.
    pub fn find(&self, name: &str) -> Option<(usize, LayerTensor)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (written, tail) = rest.split_once('.')?;
        let layer: usize = written.parse().ok()?;
        // `01` or `+1` is not layer 1.
        if layer >= self.num_layers || layer.to_string() != written {
            return None;
        }
        let (suffix, part) = tail.rsplit_once('.')?;
        let part = Part::parse(part)?;
        let t = self
            .layer_tensors()
            .into_iter()
            .find(|t| t.suffix == suffix && t.part == part)?;
        Some((layer, t))
    }

    /// The entry stored in `slot` as `piece` (0 for a whole slot).
    pub fn entry(&self, slot: Slot, piece: usize, part: Part) -> Option<LayerTensor> {
        self.layer_tensors()
            .into_iter()
            .find(|t| t.slot == slot && t.piece == piece && t.part == part)
    }

    /// The names of the projections of a module's linear layers as transformers names them
    /// inside the submodule (`q_proj`, ...), the names a LoRA config targets.
    pub fn projections(&self, module: Module) -> Vec<&'static str> {
        self.layer_tensors()
            .into_iter()
            .filter(|t| t.module == module && t.slot.is_matrix() && t.part == Part::Weight)
            .map(|t| t.suffix.split_once('.').map_or(t.suffix, |(_, p)| p))
            .collect()
    }
}

/// The Hugging Face names a fused internal name (`params_mut`'s) stands for in the checkpoint
/// layout of `cfg`'s family (itself outside the layers and when stored fused).
pub fn hf_names_of(internal: &str, cfg: &ModelConfig) -> Vec<String> {
    let Some((l, t)) = Layout::fused(cfg).find(internal) else {
        return vec![internal.to_string()];
    };
    Layout::stored(cfg)
        .layer_tensors()
        .into_iter()
        .filter(|s| s.slot == t.slot && s.part == t.part)
        .map(|s| s.name(l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};
    use std::path::PathBuf;

    const FAMILIES: [&str; 9] = [
        "llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
    ];

    fn fixture(family: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(family)
    }

    fn config(family: &str) -> ModelConfig {
        let path = fixture(family).join("config.json");
        let v = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        ModelConfig::from_json(&v, &path.display().to_string()).unwrap()
    }

    /// Names and shapes from the safetensors headers alone (every shard).
    fn checkpoint(family: &str) -> HashMap<String, Vec<usize>> {
        let mut out = HashMap::new();
        for file in crate::io::weights::safetensors_files(&fixture(family)).unwrap() {
            let bytes = std::fs::read(file).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            for (k, v) in header.as_object().unwrap() {
                if k == "__metadata__" || k.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                let shape = v["shape"].as_array().unwrap();
                let shape = shape.iter().map(|d| d.as_u64().unwrap() as usize).collect();
                out.insert(k.clone(), shape);
            }
        }
        out
    }

    #[test]
    fn the_table_names_exactly_the_tensors_of_every_family_fixture() {
        for family in FAMILIES {
            let cfg = config(family);
            let layout = Layout::stored(&cfg);
            let mut want = checkpoint(family);
            if layout.tied {
                // A tied checkpoint may carry a copy of the embedding as lm_head.
                want.remove(LM_HEAD);
            }
            let names: BTreeSet<String> = layout.hf_names().into_iter().collect();
            let have: BTreeSet<String> = want.keys().cloned().collect();
            assert_eq!(names, have, "{family}");
            let table = layout.layer_tensors();
            for l in 0..cfg.num_layers {
                for t in &table {
                    assert_eq!(want[&t.name(l)], t.shape, "{family}: {}", t.name(l));
                }
            }
            assert_eq!(want[EMBED], layout.embed().shape, "{family}");
            assert_eq!(want[FINAL_NORM], layout.final_norm().shape, "{family}");
        }
    }

    #[test]
    fn row_ranges_tile_each_fused_tensor_exactly() {
        for family in FAMILIES {
            let cfg = config(family);
            let fused = Layout::fused(&cfg).layer_tensors();
            for layout in [Layout::stored(&cfg), Layout::split(&cfg)] {
                let table = layout.layer_tensors();
                for whole in &fused {
                    let mut pieces: Vec<&LayerTensor> = table
                        .iter()
                        .filter(|t| t.slot == whole.slot && t.part == whole.part)
                        .collect();
                    pieces.sort_by_key(|t| t.piece);
                    let mut next = 0;
                    for (k, p) in pieces.iter().enumerate() {
                        assert_eq!(p.piece, k, "{family}: {}", p.suffix);
                        assert_eq!(p.rows.start, next, "{family}: {} leaves a gap", p.suffix);
                        assert_eq!(p.shape[0], p.rows.len(), "{family}: {}", p.suffix);
                        assert_eq!(p.shape[1..], whole.shape[1..], "{family}: {}", p.suffix);
                        next = p.rows.end;
                    }
                    assert_eq!(next, whole.rows.end, "{family}: {:?}", whole.slot);
                    assert_eq!(whole.shape[0], whole.rows.len(), "{family}");
                }
                // Nothing in the table falls outside a fused slot.
                for t in &table {
                    assert!(fused.iter().any(|f| f.slot == t.slot && f.part == t.part));
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_fused_names_map_to_the_stored_ones() {
        let cfg = config("llama");
        let layout = Layout::stored(&cfg);
        let (l, t) = layout
            .find("model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(
            (l, t.slot, t.piece, t.module),
            (1, Slot::Qkv, 1, Module::Attn)
        );
        for bad in [
            "model.layers.01.self_attn.k_proj.weight",
            "model.layers.1.self_attn.qkv_proj.weight",
            "model.layers.1.self_attn.k_proj",
            "model.embed_tokens.weight",
        ] {
            assert!(layout.find(bad).is_none(), "{bad}");
        }
        assert!(layout
            .find(&format!(
                "model.layers.{}.mlp.up_proj.weight",
                cfg.num_layers
            ))
            .is_none());
        assert_eq!(
            hf_names_of("model.layers.0.mlp.gate_up_proj.weight", &cfg),
            [
                "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight"
            ]
        );
        assert_eq!(hf_names_of(EMBED, &cfg), [EMBED]);
        let phi3 = config("phi3");
        assert_eq!(
            hf_names_of("model.layers.0.self_attn.qkv_proj.weight", &phi3),
            ["model.layers.0.self_attn.qkv_proj.weight"]
        );
        assert_eq!(
            Layout::stored(&phi3).projections(Module::Mlp),
            ["gate_up_proj", "down_proj"]
        );
        assert_eq!(
            layout.projections(Module::Attn),
            ["q_proj", "k_proj", "v_proj", "o_proj"]
        );
    }
}
