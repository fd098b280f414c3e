//! One decoder for every supported family; the config's switches decide norms, biases, rope,
//! windows and soft-caps. q/k/v and gate/up are held fused (as Phi-3 stores them) so that each
//! block does two large matmuls instead of five small ones.

mod cache;
mod decoder;
pub mod heads;
pub mod hooks;
pub(crate) mod layers;
pub mod layout;
pub(crate) mod live;
pub mod mask;
pub mod params;
pub mod rope;
pub mod scale;
pub mod weight;

pub use cache::KvCache;
pub use decoder::{Decoder, Logits};
pub use heads::HeadWeights;
pub use layers::{Attention, Layer, Linear, LinearGrad, Mlp, RmsNorm};
pub use mask::StepCtx;
pub use weight::{Block, Weight};
