//! Fused element-wise training ops (candle custom ops with backward passes), threaded with rayon
//! over rows: RMSNorm, rotary embeddings and the gated MLP activation.

pub mod act;
pub mod norm;
pub mod rope;
mod rows;
