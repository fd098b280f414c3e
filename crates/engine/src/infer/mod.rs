//! Inference over prompt batches: hidden-state extraction at the last prompt token, batched
//! greedy generation with KV caches (the shared prompt head computed once; locate's
//! lower-layer prefix cache), and TransformerLens-style `run_with_cache` / `run_with_hooks`.

pub mod extract;
pub mod generate;
pub mod hooked;
