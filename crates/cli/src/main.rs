//! `safety-layers`: find the safety layers of aligned chat LLMs (Li et al., ICLR 2025).

mod align_cmd;
mod commands;
mod cosine_cmd;
mod data_cmd;
mod datasets;
mod demo_cmd;
mod eval_cmd;
mod export_cmd;
mod finetune_cmd;
mod locate_cmd;
mod logits_cmd;
mod progress;

use clap::{Parser, Subcommand};

/// Huge pages for large blocks (`sl_engine::kernels::mem`): fewer page faults wherever a run
/// first touches memory (loading, the first training step).
#[global_allocator]
static ALLOC: sl_engine::kernels::mem::HugePageAlloc = sl_engine::kernels::mem::HugePageAlloc;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "safety-layers",
    version,
    about = "Find the safety layers of aligned chat LLMs and fine-tune without destroying them"
)]
struct Cli {
    /// Directory holding datasets in the catalog layout (else SAFETY_LAYERS_DATA, then the cache)
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Directory holding model files such as SmolLM2-135M-Instruct.Q4_1.gguf (else
    /// SAFETY_LAYERS_MODELS)
    #[arg(long, global = true)]
    models_dir: Option<PathBuf>,
    /// Where models run: cpu, cuda or cuda:N. Default: cuda:0 in a build with the `cuda` feature
    /// when a GPU answers, else cpu. On a GPU models compute in bf16 from 1B parameters (and for
    /// bf16 checkpoints), in f32 below; `--dtype f32` keeps f32. Training computes in f32
    #[arg(long, global = true)]
    device: Option<sl_engine::device::DeviceSpec>,
    #[command(subcommand)]
    command: Command,
}

/// How a command that only reads a model holds its weights.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LoadArgs {
    /// Weight precision: auto (the checkpoint's own storage for models of 1B parameters and
    /// more, f32 below), f32, bf16, f16, or native (the checkpoint's own storage at any size:
    /// bf16/f16 safetensors stay so, GGUF stays quantized). On the CPU activations are f32 in
    /// every case; on a GPU they take the weights' dtype (see --device)
    #[arg(long)]
    pub dtype: Option<sl_engine::io::loader::WeightDType>,
}

#[derive(clap::Args, Clone)]
pub struct PromptArgs {
    /// Prompt file (.txt / single-column .csv, one prompt per line; .csv with --column; .json or
    /// .jsonl records) or dataset name
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
        #[command(flatten)]
        load: LoadArgs,
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
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The paper's cosine analysis: where N-M similarity falls away from N-N (existence of safety
    /// layers)
    Cosine(cosine_cmd::CosineArgs),
    /// The paper's localisation: scale layer ranges, count over-rejections, sweep the bounds
    Locate(locate_cmd::LocateArgs),
    /// The whole paper end to end on a model organism, with an HTML report
    Demo(demo_cmd::DemoArgs),
    /// Safety SFT: make an aligned model organism (harmful -> refusals, benign -> own answers)
    Align(align_cmd::AlignArgs),
    /// Fine-tune: SPPFT (--freeze the safety layers), full fine-tuning, or a control freeze
    Finetune(finetune_cmd::FinetuneArgs),
    /// The paper's Table 2 columns per model: R_h on AdvBench, refusals on D_o and XSTest, Rouge-L
    /// and perplexity on held-out records
    Eval(eval_cmd::EvalArgs),
    /// Next-token log-probabilities (full vocabulary, .npy) and greedy tokens per prompt, to
    /// compare against a peer implementation such as llama.cpp
    Logits(logits_cmd::LogitsArgs),
    /// Classify saved responses (generate's JSONL) as refusals or not
    Judge(locate_cmd::JudgeArgs),
    /// Datasets by name: list them, fetch them into the cache, verify local copies
    Data {
        #[command(subcommand)]
        action: data_cmd::DataAction,
    },
    /// Convert a GGUF file into a Hugging Face directory (config, safetensors, tokenizer, chat
    /// template)
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
    /// Write the SPPFT freeze plan as a ready config for distributed trainers (axolotl, PEFT LoRA,
    /// HF Trainer + DeepSpeed)
    Export(export_cmd::ExportArgs),
    /// Batched greedy generation, optionally with a layer range's weights scaled
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        prompts: PromptArgs,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Scale the attention and MLP weights of layers I..J (0-indexed, inclusive) by ALPHA:
        /// I-J:ALPHA
        #[arg(long)]
        scale: Option<String>,
        /// What --scale multiplies: weights (the paper's) or residual (each layer's attention and
        /// MLP contributions after any post-norm)
        #[arg(long, default_value = "weights")]
        scale_target: sl_engine::ScaleTarget,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Always generate --max-new-tokens tokens
        #[arg(long)]
        ignore_eos: bool,
        /// Output JSONL: one {"prompt","response","output_ids"} per line
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
}

fn main() {
    // candle's element-wise thread pool spin-waits at every op: on 2 cores shared with anything
    // else, training ran 2.5x slower with it (train_probe, alternating runs); matmuls keep their
    // own threads. candle reads only this variable, so it stays an environment variable, set
    // first thing, while the process has one thread (set_var is unsound once others run). An
    // explicit CANDLE_NUM_THREADS still wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Behave like other command-line tools when the reader goes away (`... | head`): end
    // quietly instead of panicking on a closed stdout.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    sl_engine::io::loader::one_malloc_arena();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        // Wherever a GPU ran out of memory, say what to lower (unless the stage already did,
        // naming its batch size: sl_engine::device::explain_oom).
        let text = format!("{e:#}");
        if text.contains("OUT_OF_MEMORY") && !text.contains("lower --batch-size") {
            eprintln!(
                "hint: the GPU ran out of memory; lower --batch-size (or hold the weights in \
                 bf16 with --dtype bf16)"
            );
        }
        std::process::exit(1);
    }
}

/// Runs a command line as the binary would (the demo runs its stages through this, so each
/// stage is exactly a command a user can rerun).
pub fn run_command_line(args: &[String]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(
        std::iter::once("safety-layers".to_string()).chain(args.iter().cloned()),
    )?;
    run(cli)
}

/// The `--dtype` of a command that reads a model (None: the command has no such flag, or it was
/// left out).
fn load_dtype(c: &Command) -> Option<sl_engine::io::loader::WeightDType> {
    match c {
        Command::Inspect { load, .. }
        | Command::Hidden { load, .. }
        | Command::Generate { load, .. } => load.dtype,
        Command::Cosine(a) => a.load.dtype,
        Command::Locate(a) => a.load.dtype,
        Command::Align(a) => a.load.dtype,
        Command::Eval(a) => a.load.dtype,
        Command::Logits(a) => a.load.dtype,
        _ => None,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The catalog is handed these with each lookup (flag, else the environment variable).
    datasets::set_locations(datasets::Locations {
        data_dir: cli.data_dir.clone(),
        models_dir: cli.models_dir.clone(),
        dtype: load_dtype(&cli.command),
        device: cli.device,
    });
    match cli.command {
        Command::Inspect { model, json, .. } => commands::inspect(&model, json),
        Command::Hidden {
            model,
            prompts,
            out,
            batch_size,
            ..
        } => commands::hidden(&model, &prompts, &out, batch_size),
        Command::Cosine(args) => cosine_cmd::run(&args),
        Command::Data { action } => data_cmd::run(&action),
        Command::Locate(args) => locate_cmd::run_locate(&args),
        Command::Demo(args) => demo_cmd::run(&args),
        Command::Align(args) => align_cmd::run(&args),
        Command::Finetune(args) => finetune_cmd::run(&args),
        Command::Logits(args) => logits_cmd::run(&args),
        Command::Judge(args) => locate_cmd::run_judge(&args),
        Command::Eval(args) => eval_cmd::run(&args),
        Command::Convert { model, out, dtype } => commands::convert(&model, &out, &dtype),
        Command::Export(args) => export_cmd::run(&args),
        Command::Generate {
            model,
            prompts,
            max_new_tokens,
            scale,
            scale_target,
            batch_size,
            ignore_eos,
            out,
            ..
        } => commands::generate(
            &model,
            &prompts,
            max_new_tokens,
            scale.as_deref().map(|s| (s, scale_target)),
            batch_size,
            ignore_eos,
            &out,
        ),
    }
}
