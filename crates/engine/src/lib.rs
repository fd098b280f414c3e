//! The model engine of safety-layers, in layers:
//!
//! - [`device`]: where a model runs (`--device cpu|cuda[:N]`), the GPU's compute dtype.
//! - [`io`]: checkpoints in and out — `config.json`, safetensors (single or sharded), GGUF files
//!   and their vocabularies, the loaded [`Model`] bundle, Hugging Face directory writing.
//! - [`text`]: tokenizers, chat templates and prompt files.
//! - [`model`]: one decoder for every supported family, its named hook points (read and edit),
//!   per-head weight views, rotary embeddings, parameters by name and the paper's weight scaling.
//! - [`kernels`]: CPU kernels the decoder calls (decode-step matmul, inference attention).
//! - [`infer`]: hidden-state extraction, batched greedy generation with KV caches, and
//!   TransformerLens-style `run_with_cache` / `run_with_hooks`.
//! - [`train`]: the trainer (trainable variables, frozen linears, loss, AdamW).
//!
//! The types a researcher needs are re-exported here. A session with a model:
//!
//! ```no_run
//! use sl_engine::{Edit, GenerateOptions, Hook, HookSpec, LayerRange, Model, Positions};
//! use sl_engine::{PromptRecord, Template};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut model = Model::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! let prompts = model.prompts(&[PromptRecord::new("Name three colours.")], Template::Chat)?;
//!
//! // Logits at the last token and two activations, keyed by hook name.
//! let names = ["resid_pre.3", "mlp_out.5"];
//! let (logits, cache) = model.run_with_cache(&prompts, &names, Positions::Last)?;
//! let resid = cache.by_name("resid_pre.3").expect("read"); // [prompts, hidden]
//!
//! // Steer along that direction at layer 3's input, last token only.
//! let steer = HookSpec::none().edit(
//!     Hook::ResidPre(3),
//!     Positions::Last,
//!     Edit::Add { direction: resid.get(0)?, coeff: 2.0 },
//! );
//! let steered = model.run_with_hooks(&prompts, &steer)?;
//! assert_eq!(steered.dims(), logits.dims());
//!
//! // The paper's intervention: scale layers 6-12 by 1.2, then generate greedily.
//! let range = LayerRange::parse("6-12", model.cfg().num_layers)?;
//! model.decoder.scale_layers(range, 1.2)?;
//! let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
//! let opts = GenerateOptions { max_new_tokens: 32, ..Default::default() };
//! let out = sl_engine::greedy(&model.decoder, &ids, &model.eos_token_ids, &opts, &mut |_| {})?;
//! println!("{}", model.tokenizer.decode(&out[0], true)?);
//! model.decoder.restore_scaling();
//! # Ok(())
//! # }
//! ```

pub mod device;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod model;
pub mod text;
pub mod train;

pub use infer::extract::hidden_last;
pub use infer::generate::{greedy, greedy_with, GenerateOptions, Generation, StopReason};
pub use infer::hooked::RUN_BATCH_SIZE;
pub use io::config::{Family, ModelConfig};
pub use io::loader::{tune_allocator_around, LoadOptions, Model, Prompt};
pub use model::heads::HeadWeights;
pub use model::hooks::{ActivationCache, Edit, EditFn, Hook, HookSpec, Positions};
pub use model::scale::{LayerRange, ScaleReport, ScaleTarget};
pub use model::{Decoder, KvCache, Logits};
pub use text::prompts::{PromptRecord, Template};
pub use text::tokenizer::Tokenizer;
