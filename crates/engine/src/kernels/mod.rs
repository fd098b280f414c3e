//! CPU kernels the decoder calls where candle's general ops are slow for our shapes: the
//! decode-step matmul (few rows, each weight row streamed once) and inference attention.

pub(crate) mod attention;
pub mod matmul_small;
