//! The model engine of safety-layers: checkpoints (Hugging Face safetensors directories),
//! tokenizers and chat templates, one decoder for every supported family with named hook points,
//! weight scaling and batched greedy generation.

pub mod adamw;
mod attn_cpu;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod extract;
mod frozen_linear;
pub mod generate;
pub mod gguf;
mod gguf_tokenizer;
pub mod hooks;
pub mod matmul_small;
pub mod model;
pub mod params;
pub mod prompts;
pub mod rope;
pub mod scale;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use checkpoint::{Model, Prompt};
pub use config::{Family, ModelConfig};
pub use hooks::{Capture, Hook, Positions};
pub use model::{Decoder, KvCache, Logits};
pub use prompts::{PromptRecord, Template};
pub use scale::LayerRange;
