//! The fuzz targets: every parser that reads a file a user may have downloaded.

mod chat_template;
mod checkpoint;
mod config;
mod gguf;
mod locate_json;
mod prompts;
mod safetensors;
mod safetensors_index;
mod tokenizer;

use crate::mutate::Rng;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Where seeds come from: the workspace (committed fixtures) and `../shared` beside it (the
/// real SmolLM2 GGUF, the datasets).
pub struct Ctx {
    pub root: PathBuf,
    pub shared: PathBuf,
}

/// A format-aware mutation of one input.
pub type Mutate = fn(&mut Rng, &[u8]) -> Option<Vec<u8>>;

pub struct Target {
    pub name: &'static str,
    /// The file's name on disk: parsers choose formats by extension and errors must name it.
    pub file_name: &'static str,
    /// Seed inputs, each run as-is first and then mutated.
    pub seeds: fn(&Ctx) -> Result<Vec<Vec<u8>>>,
    /// A mutation that knows the format (None: byte-level mutations only). None as a result
    /// means "could not apply here"; the harness then mutates bytes.
    pub mutate: Option<Mutate>,
    /// Parses the file. It runs in a fresh directory of its own and may write sibling files
    /// there (an index beside shards, a tokenizer beside a config).
    pub run: fn(&Path) -> Result<()>,
    /// The memory bound: at most `mem_base + mem_factor * input length` bytes live at once.
    pub mem_base: usize,
    pub mem_factor: usize,
    /// Longest input the mutations produce.
    pub max_len: usize,
}

/// Every target, in a fixed order.
pub fn all() -> Vec<Target> {
    vec![
        config::target(),
        gguf::target(),
        safetensors::target(),
        safetensors_index::target(),
        checkpoint::target(),
        tokenizer::target(),
        chat_template::target(),
        prompts::target(),
        locate_json::target(),
    ]
}

/// The file `name` of every fixture directory (`tests/fixtures/<family>/<name>`), in name order.
pub fn fixture_files(ctx: &Ctx, name: &str) -> Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(ctx.root.join("tests/fixtures"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(name))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().map(|p| read_seed(p)).collect()
}

/// Reads a seed file, naming it on failure.
pub fn read_seed(p: &Path) -> Result<Vec<u8>> {
    use anyhow::Context;
    std::fs::read(p).with_context(|| format!("fuzz seed {}", p.display()))
}
