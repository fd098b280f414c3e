//! The engine commands: inspect, hidden, generate.

use crate::progress::Progress;
use crate::PromptArgs;
use anyhow::{bail, Result};
use serde_json::json;
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::io::atomic::{write_atomic, AtomicFile};
use sl_engine::{LayerRange, Model, Prompt, Template};
use sl_science::schema::Precision;
use std::io::Write;
use std::path::Path;

fn load(model: &Path) -> Result<Model> {
    crate::datasets::load_model(model)
}

pub(crate) fn load_prompts(m: &Model, args: &PromptArgs) -> Result<(Vec<Prompt>, Template)> {
    let template: Template = args.template.parse()?;
    let mut records =
        crate::datasets::prompt_set_with(&args.prompts, args.column.as_deref())?.records;
    if let Some(n) = args.limit {
        records.truncate(n);
    }
    let prompts = sl_science::inputs::encode_prompts(m, &records, template, &args.prompts)?;
    Ok((prompts, template))
}

pub fn inspect(model: &Path, as_json: bool) -> Result<()> {
    let m = load(model)?;
    let c = m.cfg();
    let info = sl_science::inputs::describe_model(&m, &model.display().to_string())?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("model:          {}", model.display());
        println!("family:         {:?} ({})", c.family, c.architecture);
        println!("layers:         {}", c.num_layers);
        println!("hidden size:    {}", c.hidden_size);
        println!(
            "heads:          {} ({} kv heads, head_dim {})",
            c.num_heads, c.num_kv_heads, c.head_dim
        );
        println!("intermediate:   {}", c.intermediate_size);
        println!("vocab:          {}", c.vocab_size);
        println!("parameters:     {}", m.num_parameters());
        println!(
            "dtype:          {} on disk; held as {} ({:.1} MiB, --dtype {}); f32 compute",
            info["storage"].as_str().unwrap_or("?"),
            m.weight_storage,
            m.decoder.weight_bytes() as f64 / (1 << 20) as f64,
            m.dtype_choice
        );
        println!(
            "chat template:  {}",
            if m.tokenizer.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        );
        println!("eos ids:        {:?}", m.eos_token_ids);
        println!("loaded in:      {:.2} s", m.load_seconds);
    }
    Ok(())
}

pub fn hidden(model: &Path, args: &PromptArgs, out: &Path, batch_size: usize) -> Result<()> {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "json" && ext != "safetensors" {
        bail!(
            "--out {}: expected a .json or .safetensors file name",
            out.display()
        );
    }
    let m = load(model)?;
    let (prompts, template) = load_prompts(&m, args)?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let tokens: usize = ids.iter().map(|i| i.len()).sum();
    let bar = Progress::new(prompts.len(), "hidden states");
    let t0 = std::time::Instant::now();
    let states =
        sl_engine::infer::extract::hidden_last(&m.decoder, &ids, batch_size, &mut |n| bar.inc(n))
            .map_err(|e| sl_engine::device::explain_oom(e, "hidden", batch_size))?;
    let seconds = t0.elapsed().as_secs_f64();
    bar.finish(prompts.len(), tokens, "hidden");
    let entries = m.cfg().num_hidden_entries();
    let hsize = m.cfg().hidden_size;
    if ext == "json" {
        let items: Vec<serde_json::Value> = prompts
            .iter()
            .zip(&states)
            .map(|(p, s)| -> Result<serde_json::Value> {
                Ok(json!({"prompt": p.text, "input_ids": p.ids,
                          "hidden_last": s.to_vec2::<f32>()?}))
            })
            .collect::<Result<_>>()?;
        let doc = json!({
            "model": model.display().to_string(),
            "precision": Precision::of(&m),
            "template": template.name(),
            "num_entries": entries,
            "hidden_size": hsize,
            "timings": {"tokens": tokens, "seconds": seconds, "batch_size": batch_size},
            "items": items,
        });
        write_atomic(out, serde_json::to_string(&doc)?.as_bytes())?;
    } else {
        let stacked = candle_core::Tensor::stack(&states, 0)?;
        let data: Vec<f32> = stacked.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![prompts.len(), entries, hsize],
            &bytes,
        )?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("model".to_string(), model.display().to_string());
        meta.insert(
            "precision".to_string(),
            serde_json::to_string(&Precision::of(&m))?,
        );
        meta.insert("template".to_string(), template.name().to_string());
        meta.insert(
            "timings".to_string(),
            json!({"tokens": tokens, "seconds": seconds, "batch_size": batch_size}).to_string(),
        );
        meta.insert("input_ids".to_string(), serde_json::to_string(&ids)?);
        meta.insert(
            "prompts".to_string(),
            serde_json::to_string(&prompts.iter().map(|p| &p.text).collect::<Vec<_>>())?,
        );
        let buf = safetensors::tensor::serialize([("hidden_last", view)], Some(meta))?;
        write_atomic(out, &buf)?;
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Parses `I-J:ALPHA`.
pub fn parse_scale(s: &str, num_layers: usize) -> Result<(LayerRange, f64)> {
    let (r, a) = s
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--scale `{s}`: expected I-J:ALPHA, e.g. 6-12:1.2"))?;
    let range = LayerRange::parse(r, num_layers)?;
    let alpha: f64 = a
        .parse()
        .map_err(|_| anyhow::anyhow!("--scale `{s}`: `{a}` is not a number"))?;
    if !alpha.is_finite() || alpha <= 0.0 {
        bail!("--scale `{s}`: alpha must be a positive finite number");
    }
    Ok((range, alpha))
}

pub fn generate(
    model: &Path,
    args: &PromptArgs,
    max_new_tokens: usize,
    scale: Option<(&str, sl_engine::ScaleTarget)>,
    batch_size: usize,
    ignore_eos: bool,
    out: &Path,
) -> Result<()> {
    let mut m = load(model)?;
    if let Some((s, target)) = scale {
        let (range, alpha) = parse_scale(s, m.cfg().num_layers)?;
        let rep = m.decoder.scale_layers_with(range, alpha, target)?;
        match target {
            sl_engine::ScaleTarget::Weights => {
                eprintln!(
                    "scaled {} matrices of layers {range} by {alpha}",
                    rep.matrices.len()
                );
                for note in m.decoder.weight_scaling_notes() {
                    eprintln!("note: on this family {note} (see --scale-target residual)");
                }
            }
            sl_engine::ScaleTarget::Residual => {
                eprintln!("scaled the attention and MLP contributions of layers {range} by {alpha}")
            }
        }
    }
    let (prompts, _) = load_prompts(&m, args)?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let opts = GenerateOptions {
        max_new_tokens,
        batch_size,
        ignore_eos,
        no_cache: false,
        first_mass_of: vec![],
    };
    let bar = Progress::new(prompts.len(), "generate");
    let t0 = std::time::Instant::now();
    let outs = greedy(&m.decoder, &ids, &m.eos_token_ids, &opts, &mut |n| {
        bar.inc(n)
    })
    .map_err(|e| sl_engine::device::explain_oom(e, "generate", batch_size))?;
    let seconds = t0.elapsed().as_secs_f64();
    let new_tokens: usize = outs.iter().map(|o| o.len()).sum();
    bar.finish(prompts.len(), new_tokens, "generate (new tokens)");
    eprintln!(
        "generated {new_tokens} tokens for {} prompts in {seconds:.3} s",
        prompts.len()
    );
    let mut f = AtomicFile::create(out)?;
    for (p, o) in prompts.iter().zip(&outs) {
        let response = m.tokenizer.decode(o, true)?;
        let line = json!({"prompt": p.text, "response": response, "output_ids": o});
        writeln!(f.writer(), "{}", serde_json::to_string(&line)?)?;
    }
    f.commit()?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

pub fn convert(model: &Path, out: &Path, dtype: &str) -> Result<()> {
    let dt = match dtype {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let model = &crate::datasets::model_path(model)?;
    if !model
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        bail!("--model {}: convert reads .gguf files", model.display());
    }
    let t0 = std::time::Instant::now();
    sl_engine::io::hf_dir::convert_gguf(model, out, dt)?;
    eprintln!(
        "wrote {} ({dtype}) in {:.1} s",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
