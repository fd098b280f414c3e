//! CPU kernels the decoder calls where candle's general ops are slow for our shapes or hold
//! too much memory: the decode-step matmul (few rows, each weight row streamed once), matmuls on
//! bf16/f16 weights widened a tile at a time, matmuls on quantized weights, and inference
//! attention.

pub(crate) mod attention;
pub mod matmul_small;
pub mod quant;
pub mod widen;
