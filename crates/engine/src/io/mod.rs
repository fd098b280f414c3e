//! Checkpoints in and out: `config.json` to one [`config::ModelConfig`], safetensors and GGUF
//! tensors to Hugging Face names, GGUF vocabularies to a `tokenizer.json`, the loaded
//! [`loader::Model`], and Hugging Face directories written atomically.

pub mod atomic;
pub mod config;
pub mod gguf;
pub mod gguf_check;
pub mod gguf_vocab;
pub mod hf_dir;
pub mod loader;
pub mod rope_config;
pub mod weights;
