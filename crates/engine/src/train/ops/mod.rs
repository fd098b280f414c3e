//! Fused training operations: candle custom ops whose backward passes write each gradient in
//! one pass on rayon threads, in place of chains of small candle ops (each of which allocates its
//! result and, in backward, a zeroed gradient it then adds into). `portable` holds the same ops
//! composed of candle's device-generic ops: the GPU's training path.

pub mod act;
pub mod attention;
mod block;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod portable;
pub mod rope;
mod rows;

pub(crate) use rows::{cpu_f32, f32_slice, with_rows};
