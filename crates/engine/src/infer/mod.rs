//! Inference over prompt batches: hidden-state extraction at the last prompt token and batched
//! greedy generation with KV caches (the shared prompt head computed once; locate's
//! lower-layer prefix cache).

pub mod extract;
pub mod generate;
