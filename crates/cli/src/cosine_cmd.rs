//! `safety-layers cosine`.

use crate::progress::Progress;
use anyhow::{Context, Result};
use sl_engine::prompts::read_prompts;
use sl_engine::{Model, Template};
use sl_science::cosine::Pairs;
use sl_science::cosine_report::{analyse, write, CosineConfig, PromptSet};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct CosineArgs {
    /// Model: Hugging Face directory or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Normal prompts (file)
    #[arg(long, default_value = "paper-normal")]
    pub normal: String,
    /// Malicious prompts (file)
    #[arg(long, default_value = "paper-malicious")]
    pub malicious: String,
    /// Prompt format: alpaca (the paper's), chat or raw
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    /// Random pairs per type (N-N, M-M, N-M), or `all` for the exact statistics over every pair
    #[arg(long, default_value = "500")]
    pub pairs: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A second model run on the same prompts and drawn in the same figures (e.g. the base model)
    #[arg(long)]
    pub compare: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Output directory
    #[arg(long)]
    pub out: PathBuf,
}

/// A prompt set from a file path or a catalog name.
pub fn prompt_set(spec: &str) -> Result<PromptSet> {
    let path = Path::new(spec);
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {spec}"))?;
        return Ok(PromptSet { name: spec.to_string(), records: read_prompts(path, None)?, sha256: sl_science::sha256_hex(&bytes) });
    }
    crate::datasets::prompt_set(spec)
}

fn load(p: &Path) -> Result<Model> {
    Model::load(p).with_context(|| format!("cannot load model {}", p.display()))
}

pub fn run(a: &CosineArgs) -> Result<()> {
    let cfg = CosineConfig {
        template: a.template.parse::<Template>()?,
        pairs: a.pairs.parse::<Pairs>()?,
        seed: a.seed,
        batch_size: a.batch_size,
    };
    let normal = prompt_set(&a.normal)?;
    let malicious = prompt_set(&a.malicious)?;
    let n = normal.records.len() + malicious.records.len();
    let mut runs = Vec::new();
    for m in std::iter::once(&a.model).chain(a.compare.as_ref()) {
        let model = load(m)?;
        let bar = Progress::new(n, &format!("cosine {}", m.display()));
        let r = analyse(&model, &m.display().to_string(), &normal, &malicious, &cfg, &mut |k| bar.inc(k))?;
        bar.finish(r.prompts, r.tokens, "cosine");
        runs.push(r);
    }
    write(&a.out, &runs[0], runs.get(1), &normal, &malicious, &cfg)?;
    let main = &runs[0];
    match main.curves.initial_range {
        Some(r) => eprintln!("initial safety range: layers {}-{} (steepest growth at layer {})", r.first, r.last, r.steepest),
        None => eprintln!("no initial safety range: the N-M vs N-N gap never grows by 1 degree per layer"),
    }
    if let Some(e) = main.curves.largest_gap() {
        eprintln!("largest N-M vs N-N gap: {:.2} degrees at the output of layer {}", e.gap_code_deg, e.entry as i64 - 1);
    }
    eprintln!("rule: {}", main.curves.rule);
    eprintln!("wrote {}/cosine.json, cosine.csv, cosine.svg, angle_gap.svg", a.out.display());
    Ok(())
}
