//! `safety-layers align`: safety SFT that turns a chat model which does not refuse into an
//! aligned model organism (harmful prompts -> refusals, benign prompts -> its own answers).

use anyhow::Result;
use sl_science::align::{align, AlignData, AlignOptions, Sets};
use sl_science::finetune::FinetuneConfig;
use std::path::PathBuf;

/// Sets whose prompts training must never see: everything the paper evaluates or analyses.
pub const PROTECTED: &[&str] = &[
    "advbench",
    "paper-advbench",
    "over-rejection",
    "xstest",
    "paper-normal",
    "paper-malicious",
];
/// The paper's normal sets, which benign training prompts must also avoid.
pub const BENIGN_EXCLUDE: &[&str] = &["finetune-normal", "finetune-implicit"];

#[derive(clap::Args, Clone)]
pub struct AlignArgs {
    /// The chat model to align: Hugging Face directory, .gguf file or catalog name
    #[arg(long)]
    pub model: PathBuf,
    /// Output checkpoint directory
    #[arg(long)]
    pub out: PathBuf,
    /// Harmful prompt sources (dataset names or files), comma-separated
    #[arg(
        long,
        default_value = "harmbench,strongreject,jailbreakbench,malicious-instruct,tdc2023",
        value_delimiter = ','
    )]
    pub harmful: Vec<String>,
    /// Benign prompt pool (dataset name or file)
    #[arg(long, default_value = "alpaca")]
    pub benign: String,
    #[arg(long, default_value_t = 300)]
    pub harmful_n: usize,
    #[arg(long, default_value_t = 300)]
    pub benign_n: usize,
    /// Tokens of the model's own answer kept as each benign target
    #[arg(long, default_value_t = 64)]
    pub answer_tokens: usize,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 160)]
    pub max_len: usize,
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Plant the alignment in layers I-J: only their attention and MLP weights train, everything
    /// else stays frozen (a positive control for cosine/locate/SPPFT)
    #[arg(long)]
    pub train_layers: Option<String>,
    #[command(flatten)]
    pub load: crate::LoadArgs,
}

fn sets(names: &[&str]) -> Result<Sets> {
    names
        .iter()
        .map(|n| {
            Ok((
                n.to_string(),
                crate::datasets::prompt_set(n)?
                    .records
                    .into_iter()
                    .map(|r| r.instruction)
                    .collect(),
            ))
        })
        .collect()
}

pub fn run(a: &AlignArgs) -> Result<()> {
    let model = crate::datasets::load_model_for_training(&a.model)?;
    let train_layers = a
        .train_layers
        .as_deref()
        .map(|s| sl_engine::LayerRange::parse(s, model.cfg().num_layers))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--train-layers: {e}"))?;
    sl_engine::io::loader::tune_allocator_for_training();
    let harmful_names: Vec<&str> = a.harmful.iter().map(|s| s.as_str()).collect();
    let data = AlignData {
        harmful: sets(&harmful_names)?,
        protected: sets(PROTECTED)?,
        benign_pool: crate::datasets::prompt_set(&a.benign)?
            .records
            .into_iter()
            .map(|r| r.instruction)
            .collect(),
        benign_exclude: sets(BENIGN_EXCLUDE)?,
    };
    let opts = AlignOptions {
        harmful_n: a.harmful_n,
        benign_n: a.benign_n,
        answer_tokens: a.answer_tokens,
        batch_size: 16,
        seed: a.seed,
    };
    let train = FinetuneConfig {
        model: a.model.display().to_string(),
        data: "align: harmful -> refusals, benign -> self-distilled answers".into(),
        freeze: None,
        freeze_modules: vec![],
        epochs: a.epochs,
        lr: a.lr,
        lr_schedule: sl_science::finetune::data::Schedule::Linear,
        warmup_steps: a.warmup_steps,
        batch_size: a.batch_size,
        grad_accum: 1,
        max_len: a.max_len,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        template: a.template.parse()?,
        // Safety SFT supervises the answers only.
        train_on_inputs: false,
        holdout: 0,
        seed: a.seed,
        shuffle: true,
        grad_checkpointing: false,
        freeze_embeddings: false,
        train_layers,
        bf16_mixed: false,
        max_steps: None,
        dtype: "auto".into(),
    };
    let mut last = (String::new(), 0usize);
    let doc = align(model, &data, &opts, &train, &a.out, &mut |stage, n| {
        if stage != last.0 || n >= last.1 + 10 {
            eprintln!("align: {stage} {n}");
            last = (stage.to_string(), n);
        }
    })?;
    eprintln!(
        "align: {} records ({} harmful, {} benign kept), {} steps, final loss {:.4}, {:.0} s -> {}",
        doc["data"]["records"],
        doc["data"]["harmful"]["chosen"],
        doc["data"]["benign"]["kept"],
        doc["training"]["steps"],
        doc["training"]["final_loss"].as_f64().unwrap_or(f64::NAN),
        doc["seconds"]["total"].as_f64().unwrap_or(0.0),
        a.out.display()
    );
    Ok(())
}
