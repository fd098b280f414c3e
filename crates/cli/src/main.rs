//! `safety-layers`: find the safety layers of aligned chat LLMs (Li et al., ICLR 2025).

mod commands;
mod cosine_cmd;
mod data_cmd;
mod datasets;
mod eval_cmd;
mod locate_cmd;
mod output;
mod progress;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "safety-layers", version, about = "Find the safety layers of aligned chat LLMs and fine-tune without destroying them")]
struct Cli {
    /// Directory holding datasets in the catalog layout (else SAFETY_LAYERS_DATA, then the cache)
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Directory holding model files such as SmolLM2-135M-Instruct.Q4_1.gguf (else SAFETY_LAYERS_MODELS)
    #[arg(long, global = true)]
    models_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub struct PromptArgs {
    /// Prompt file (.txt / single-column .csv, one prompt per line; .csv with --column; .json or .jsonl records) or dataset name
    #[arg(long)]
    pub prompts: String,
    /// Column (CSV with header) or field (JSON/JSONL) holding the prompt
    #[arg(long)]
    pub column: Option<String>,
    /// Prompt format: alpaca (the paper's), chat (the model's template) or raw
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    /// Use only the first N prompts
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint's family, shape, dtype, chat template and EOS ids
    Inspect {
        /// Hugging Face directory, .gguf file or catalog name (e.g. smollm2-135m-instruct)
        #[arg(long)]
        model: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Last-token hidden states of every layer (transformers' output_hidden_states convention)
    Hidden {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        prompts: PromptArgs,
        /// Output: .json, or .safetensors (one [prompts, entries, hidden] tensor)
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
    /// The paper's cosine analysis: where N-M similarity falls away from N-N (existence of safety layers)
    Cosine(cosine_cmd::CosineArgs),
    /// The paper's localisation: scale layer ranges, count over-rejections, sweep the bounds
    Locate(locate_cmd::LocateArgs),
    /// The paper's Table 2 columns per model: R_h on AdvBench, refusals on D_o and XSTest, Rouge-L and perplexity on held-out records
    Eval(eval_cmd::EvalArgs),
    /// Classify saved responses (generate's JSONL) as refusals or not
    Judge(locate_cmd::JudgeArgs),
    /// Datasets by name: list them, fetch them into the cache, verify local copies
    Data {
        #[command(subcommand)]
        action: data_cmd::DataAction,
    },
    /// Convert a GGUF file into a Hugging Face directory (config, safetensors, tokenizer, chat template)
    Convert {
        /// The .gguf file
        #[arg(long)]
        model: PathBuf,
        /// Output directory (must not exist or be empty)
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the written weights: f32, bf16 or f16
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Batched greedy generation, optionally with a layer range's weights scaled
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        prompts: PromptArgs,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Scale the attention and MLP weights of layers I..J (0-indexed, inclusive) by ALPHA: I-J:ALPHA
        #[arg(long)]
        scale: Option<String>,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Always generate --max-new-tokens tokens
        #[arg(long)]
        ignore_eos: bool,
        /// Output JSONL: one {"prompt","response","output_ids"} per line
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    // Behave like other command-line tools when the reader goes away (`... | head`): end
    // quietly instead of panicking on a closed stdout.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // The catalog reads its locations from the environment; the flags override it.
    if let Some(d) = &cli.data_dir {
        std::env::set_var("SAFETY_LAYERS_DATA", d);
    }
    if let Some(d) = &cli.models_dir {
        std::env::set_var("SAFETY_LAYERS_MODELS", d);
    }
    let result = match cli.command {
        Command::Inspect { model, json } => commands::inspect(&model, json),
        Command::Hidden { model, prompts, out, batch_size } => commands::hidden(&model, &prompts, &out, batch_size),
        Command::Cosine(args) => cosine_cmd::run(&args),
        Command::Data { action } => data_cmd::run(&action),
        Command::Locate(args) => locate_cmd::run_locate(&args),
        Command::Judge(args) => locate_cmd::run_judge(&args),
        Command::Eval(args) => eval_cmd::run(&args),
        Command::Convert { model, out, dtype } => commands::convert(&model, &out, &dtype),
        Command::Generate { model, prompts, max_new_tokens, scale, batch_size, ignore_eos, out } => {
            commands::generate(&model, &prompts, max_new_tokens, scale.as_deref(), batch_size, ignore_eos, &out)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
