//! Text in: tokenizers (Hugging Face `tokenizer.json`), chat templates rendered as transformers
//! renders them, and prompt files with the paper's Alpaca format.

pub mod chat;
pub mod prompts;
pub mod tokenizer;
