//! `safety-layers cosine`.

use crate::datasets::{load_model, prompt_set};
use crate::progress::Progress;
use anyhow::Result;
use sl_engine::Template;
use sl_science::cosine::report::{analyse, write, CosineConfig};
use sl_science::cosine::Pairs;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CosineArgs {
    /// Model: Hugging Face directory, .gguf file or catalog name
    #[arg(long)]
    pub model: PathBuf,
    /// Normal prompts (file or dataset name)
    #[arg(long, default_value = "paper-normal")]
    pub normal: String,
    /// Malicious prompts (file or dataset name)
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
    #[command(flatten)]
    pub load: crate::LoadArgs,
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
        let model = load_model(m)?;
        let bar = Progress::new(n, &format!("cosine {}", m.display()));
        let r = analyse(
            &model,
            &m.display().to_string(),
            &normal,
            &malicious,
            &cfg,
            &mut |k| bar.inc(k),
        )?;
        bar.finish(r.prompts, r.tokens, "cosine");
        runs.push(r);
    }
    write(&a.out, &runs[0], runs.get(1), &normal, &malicious, &cfg)?;
    let main = &runs[0];
    match main.curves.initial_range {
        Some(r) => eprintln!(
            "initial safety range: layers {}-{} (steepest growth at layer {})",
            r.first, r.last, r.steepest
        ),
        None => eprintln!(
            "no initial safety range: the N-M vs N-N gap never grows by 1 degree per layer"
        ),
    }
    if let Some(e) = main.curves.largest_gap() {
        eprintln!(
            "largest N-M vs N-N gap: {:.2} degrees at the output of layer {}",
            e.gap_code_deg,
            e.entry as i64 - 1
        );
    }
    eprintln!("rule: {}", main.curves.rule);
    eprintln!(
        "wrote {}/cosine.json, cosine.csv, cosine.svg, angle_gap.svg",
        a.out.display()
    );
    Ok(())
}
