//! The model engine of safety-layers, in layers:
//!
//! - [`io`]: checkpoints in and out — `config.json`, safetensors (single or sharded), GGUF files
//!   and their vocabularies, the loaded [`Model`] bundle, Hugging Face directory writing.
//! - [`text`]: tokenizers, chat templates and prompt files.
//! - [`model`]: one decoder for every supported family, its named hook points, rotary
//!   embeddings, parameters by name and the paper's weight scaling.
//! - [`kernels`]: CPU kernels the decoder calls (decode-step matmul, inference attention).
//! - [`infer`]: hidden-state extraction and batched greedy generation with KV caches.
//! - [`train`]: the trainer (trainable variables, frozen linears, loss, AdamW).

pub mod infer;
pub mod io;
pub mod kernels;
pub mod model;
pub mod text;
pub mod train;

pub use io::config::{Family, ModelConfig};
pub use io::loader::{Model, Prompt};
pub use model::hooks::{Capture, Hook, Positions};
pub use model::scale::LayerRange;
pub use model::{Decoder, KvCache, Logits};
pub use text::prompts::{PromptRecord, Template};
