//! The engine crate's integration tests, one binary (one link, one run); shared paths and
//! helpers are in common.rs.

mod bad_inputs;
mod bf16;
mod common;
mod families;
mod gguf_sentencepiece;
mod gguf_smollm2;
mod prefix_cache;
mod quantized;
mod real_tokenizers;
mod train_packed;
