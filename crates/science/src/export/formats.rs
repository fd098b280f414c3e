//! The freeze plan written for other trainers: an axolotl YAML, a PEFT `adapter_config.json`, a
//! Hugging Face Trainer script with its DeepSpeed ZeRO-2 config, and `freeze_plan.json` (every
//! tensor name, frozen or not) beside each of them.

use crate::export::plan::{hf_parameter_names, FreezePlan, LoraTargets, Recipe};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use sl_engine::text::prompts::{ALPACA, ALPACA_INPUT};
use sl_engine::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Axolotl,
    Peft,
    HfTrainer,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Format> {
        Ok(match s {
            "axolotl" => Format::Axolotl,
            "peft" => Format::Peft,
            "hf-trainer" => Format::HfTrainer,
            other => bail!("unknown --format `{other}` (expected axolotl, peft or hf-trainer)"),
        })
    }
}

/// Where the trainers find the model and the data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sources {
    /// What `from_pretrained` is given: a local HF directory or a hub id.
    pub base_model: String,
    /// The `{instruction, input, output}` records (JSON array or JSONL).
    pub data: String,
    /// Where the model's config was read from.
    pub config_from: String,
}

/// The file names and contents to write for `format`.
pub fn render(
    format: Format,
    plan: &FreezePlan,
    cfg: &ModelConfig,
    recipe: &Recipe,
    src: &Sources,
) -> Result<Vec<(String, String)>> {
    let mut files = match format {
        Format::Axolotl => vec![
            ("axolotl.yaml".to_string(), axolotl_yaml(plan, recipe, src)),
            ds_zero2(),
        ],
        Format::Peft => vec![(
            "adapter_config.json".to_string(),
            pretty(&adapter_config(plan, recipe, src)?),
        )],
        Format::HfTrainer => vec![
            (
                "train_sppft.py".to_string(),
                hf_trainer_script(plan, recipe, src),
            ),
            ds_zero2(),
        ],
    };
    files.push((
        "freeze_plan.json".to_string(),
        pretty(&plan_json(format, plan, cfg, recipe, src)?),
    ));
    files.push(("README.md".to_string(), readme(format, plan, src)));
    Ok(files)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// A float as YAML/Python read it back as a float: always with a dot, never an exponent (PyYAML
/// takes `1e-08` for a string).
fn float(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// A double-quoted scalar: JSON's string syntax is valid YAML and valid Python.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn plan_json(
    format: Format,
    plan: &FreezePlan,
    cfg: &ModelConfig,
    recipe: &Recipe,
    src: &Sources,
) -> Result<Value> {
    let (frozen, trainable) = plan.split();
    let lora = match format {
        Format::Peft => Some(plan.lora_targets()?),
        _ => None,
    };
    Ok(json!({
        "format": format,
        "sources": src,
        "model": {"family": plan.family, "architecture": plan.architecture,
                  "num_layers": plan.num_layers, "tie_word_embeddings": cfg.tie_word_embeddings},
        "freeze": {"first": plan.range.first, "last": plan.range.last, "modules": plan.modules,
                   "rule": "in layers first..=last, every parameter under the named submodules \
                            (self_attn, mlp) is frozen; norms, embeddings, the final norm and \
                            lm_head train"},
        "recipe": recipe,
        "parameters": hf_parameter_names(cfg).len(),
        "frozen_parameters": frozen,
        "trainable_parameters": trainable,
        "axolotl_unfrozen_parameters":
            plan.axolotl_unfrozen().into_iter().map(|p| p.pattern).collect::<Vec<_>>(),
        "lora_targets": lora,
    }))
}

/// ZeRO-2 with every size left to the Trainer ("auto"); no optimizer or scheduler section, so
/// the Trainer builds torch AdamW and transformers' schedule, the paper's semantics.
fn ds_zero2() -> (String, String) {
    let v = json!({
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": true,
            "contiguous_gradients": true,
            "allgather_partitions": true,
            "reduce_scatter": true,
            "allgather_bucket_size": 200_000_000u64,
            "reduce_bucket_size": 200_000_000u64
        },
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "zero_allow_untested_optimizer": true,
        "wall_clock_breakdown": false
    });
    ("ds_zero2.json".to_string(), pretty(&v))
}

fn axolotl_yaml(plan: &FreezePlan, r: &Recipe, src: &Sources) -> String {
    let bf16 = r.precision == "bf16";
    let mut y = String::new();
    let mut line = |s: String| {
        y.push_str(&s);
        y.push('\n');
    };
    line(format!(
        "# SPPFT (Li et al., ICLR 2025): layers {} of this {}-layer {} train with their {} frozen.",
        plan.range,
        plan.num_layers,
        plan.architecture,
        modules_text(plan)
    ));
    line(
        "# Written by `safety-layers export`; freeze_plan.json beside it lists every tensor, \
         frozen or not."
            .into(),
    );
    line(
        "# Run from this directory (ds_zero2.json is found relative to it):  \
         axolotl train axolotl.yaml"
            .into(),
    );
    line(format!("base_model: {}", quoted(&src.base_model)));
    line("model_type: AutoModelForCausalLM".into());
    line("tokenizer_type: AutoTokenizer".into());
    line(String::new());
    line(
        "# The paper's {instruction, input, output} records in the Alpaca template (Input variant \
         when"
            .into(),
    );
    line("# the record has one), ended by the tokenizer's EOS.".into());
    line("datasets:".into());
    line(format!("  - path: {}", quoted(&src.data)));
    line("    ds_type: json".into());
    line("    type: alpaca".into());
    line(format!(
        "val_set_size: {}  # records held out (axolotl draws them at random)",
        r.holdout
    ));
    line("dataset_prepared_path: last_run_prepared".into());
    line("output_dir: ./sppft-out".into());
    line(String::new());
    line(format!("sequence_len: {}", r.max_len));
    line("sample_packing: false".into());
    line("pad_to_sequence_len: false".into());
    line(format!(
        "train_on_inputs: {}  # loss on the prompt too, as the paper's code",
        r.train_on_inputs
    ));
    line(String::new());
    line(format!("num_epochs: {}", r.epochs));
    line(format!("micro_batch_size: {}", r.micro_batch_size));
    line(format!(
        "gradient_accumulation_steps: {}  # per GPU: the paper's batch is {} on one process; \
         divide by the GPU count to keep it",
        r.grad_accum,
        r.micro_batch_size * r.grad_accum
    ));
    line(format!("learning_rate: {}  # {}", float(r.lr), r.lr_source));
    line(format!("lr_scheduler: {}", r.hf_scheduler()));
    line(format!("warmup_steps: {}", r.warmup_steps));
    line("optimizer: adamw_torch".into());
    line(format!("adam_beta1: {}", float(r.adam_beta1)));
    line(format!("adam_beta2: {}", float(r.adam_beta2)));
    line(format!("adam_epsilon: {}", float(r.adam_epsilon)));
    line(format!("weight_decay: {}", float(r.weight_decay)));
    line(format!("max_grad_norm: {}", float(r.max_grad_norm)));
    line(format!("seed: {}", r.seed));
    line(String::new());
    line(format!(
        "bf16: {bf16}  # {}",
        if bf16 {
            "mixed precision"
        } else {
            "the paper trains in fp32"
        }
    ));
    line("fp16: false".into());
    line("tf32: false".into());
    line(format!("gradient_checkpointing: {}", r.grad_checkpointing));
    line("deepspeed: ds_zero2.json".into());
    line("logging_steps: 1".into());
    line("saves_per_epoch: 1".into());
    if r.holdout > 0 {
        line("evals_per_epoch: 1".into());
    }
    line(String::new());
    line(
        "# axolotl freezes every parameter, then unfreezes those a pattern matches (Python \
         re.match from"
            .into(),
    );
    line(
        "# the start of the name; a `.` is a literal dot). Everything but the frozen range stays \
         trainable."
            .into(),
    );
    line("unfrozen_parameters:".into());
    for p in plan.axolotl_unfrozen() {
        line(format!("  # {}", p.keeps));
        line(format!("  - {}", quoted(&p.pattern)));
    }
    y
}

fn modules_text(plan: &FreezePlan) -> String {
    plan.modules
        .iter()
        .map(|m| m.hf_module())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// As PEFT's `LoraConfig.save_pretrained` writes it (the long-standing keys; newer PEFT fills
/// the rest with defaults).
fn adapter_config(plan: &FreezePlan, r: &Recipe, src: &Sources) -> Result<Value> {
    let (target_modules, layers_to_transform, layers_pattern) = match plan.lora_targets()? {
        LoraTargets::Layers {
            target_modules,
            layers_to_transform,
        } => (
            json!(target_modules),
            json!(layers_to_transform),
            json!("layers"),
        ),
        LoraTargets::Regex(re) => (json!(re), Value::Null, Value::Null),
    };
    Ok(json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": src.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": false,
        "init_lora_weights": true,
        "layers_pattern": layers_pattern,
        "layers_to_transform": layers_to_transform,
        "lora_alpha": r.lora_alpha,
        "lora_dropout": r.lora_dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": r.lora_r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false
    }))
}

fn hf_trainer_script(plan: &FreezePlan, r: &Recipe, src: &Sources) -> String {
    let (frozen, _) = plan.split();
    let modules: Vec<String> = plan.modules.iter().map(|m| quoted(m.hf_module())).collect();
    let mut c = String::new();
    c.push_str(&format!(
        "# The plan: layers {} of {} ({}), {} frozen tensors.\n",
        plan.range,
        src.config_from,
        plan.architecture,
        frozen.len()
    ));
    c.push_str(&format!("BASE_MODEL = {}\n", quoted(&src.base_model)));
    c.push_str(&format!("DATA = {}\n", quoted(&src.data)));
    c.push_str("OUTPUT_DIR = \"sppft-out\"\n");
    c.push_str(&format!(
        "FREEZE_FIRST, FREEZE_LAST = {}, {}  # 0-indexed, inclusive\n",
        plan.range.first, plan.range.last
    ));
    c.push_str(&format!("FREEZE_MODULES = ({},)\n", modules.join(", ")));
    c.push_str("FROZEN_PARAMETERS = [\n");
    for n in &frozen {
        c.push_str(&format!("    {},\n", quoted(n)));
    }
    c.push_str("]\n");
    c.push_str(&format!("EPOCHS = {}\n", r.epochs));
    c.push_str(&format!("LR = {}  # {}\n", float(r.lr), r.lr_source));
    c.push_str(&format!("LR_SCHEDULER = {}\n", quoted(r.hf_scheduler())));
    c.push_str(&format!("WARMUP_STEPS = {}\n", r.warmup_steps));
    c.push_str(&format!("MICRO_BATCH_SIZE = {}\n", r.micro_batch_size));
    c.push_str(&format!("GRAD_ACCUM = {}\n", r.grad_accum));
    c.push_str(&format!("MAX_LEN = {}\n", r.max_len));
    c.push_str(&format!("WEIGHT_DECAY = {}\n", float(r.weight_decay)));
    c.push_str(&format!("MAX_GRAD_NORM = {}\n", float(r.max_grad_norm)));
    c.push_str(&format!(
        "ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = {}, {}, {}\n",
        float(r.adam_beta1),
        float(r.adam_beta2),
        float(r.adam_epsilon)
    ));
    c.push_str(&format!(
        "HOLDOUT = {}  # the last N records, evaluated each epoch\n",
        r.holdout
    ));
    c.push_str(&format!("SEED = {}\n", r.seed));
    c.push_str(&format!(
        "TRAIN_ON_INPUTS = {}\n",
        if r.train_on_inputs { "True" } else { "False" }
    ));
    c.push_str(&format!(
        "PRECISION = {}  # fp32 is the paper's; bf16 = mixed precision over fp32 weights\n",
        quoted(&r.precision)
    ));
    c.push_str(&format!(
        "GRAD_CHECKPOINTING = {}\n",
        if r.grad_checkpointing {
            "True"
        } else {
            "False"
        }
    ));
    c.push_str(&format!("ALPACA = {}\n", quoted(ALPACA)));
    c.push_str(&format!("ALPACA_INPUT = {}", quoted(ALPACA_INPUT)));
    include_str!("hf_trainer.py").replace("# @@PLAN@@", &c)
}

fn readme(format: Format, plan: &FreezePlan, src: &Sources) -> String {
    let head = format!(
        "# SPPFT plan: {} layers {} frozen ({})\n\nWritten by `safety-layers export` from {}. \
         `freeze_plan.json` lists every parameter of the model by its Hugging Face name, frozen or \
         trainable, and the recipe (the paper's hyper-parameters unless overridden). Model: `{}`. \
         Data: `{}`.\n\n",
        plan.architecture,
        plan.range,
        modules_text(plan),
        src.config_from,
        src.base_model,
        src.data
    );
    let body = match format {
        Format::Axolotl => {
            "`axolotl.yaml` is a full fine-tune whose `unfrozen_parameters` leave only the \
             range's frozen submodules out; DeepSpeed ZeRO-2 (`ds_zero2.json`) shards gradients \
             and optimizer state.\n\n\
             ```sh\ncd THIS_DIR && axolotl train axolotl.yaml\n```\n\n\
             `gradient_accumulation_steps` counts per GPU: divide it by the number of GPUs to keep \
             the paper's batch.\n"
        }
        Format::Peft => {
            "`adapter_config.json` is a PEFT LoRA config for LoRA-SPPFT: adapters on the \
             projections of every layer outside the range (`layers_to_transform`), none on the \
             frozen submodules inside it. The base model is frozen by PEFT as usual.\n\n\
             ```python\nfrom peft import LoraConfig, get_peft_model\n\
             model = get_peft_model(model, LoraConfig.from_pretrained(\"THIS_DIR\"))\n```\n\n\
             With `safety-layers export --format hf-trainer`, `train_sppft.py --lora THIS_DIR` \
             trains it.\n"
        }
        Format::HfTrainer => {
            "`train_sppft.py` loads the model in fp32, sets `requires_grad = False` on exactly \
             the planned tensors (it stops if the model's names differ from the plan), and trains \
             with the Hugging Face Trainer and DeepSpeed ZeRO-2 (`ds_zero2.json`).\n\n\
             ```sh\ncd THIS_DIR && deepspeed --num_gpus 8 train_sppft.py\n```\n\n\
             `--no-deepspeed` runs one process without DeepSpeed; `--max-steps N` makes a smoke \
             run.\n"
        }
    };
    head + body
}
