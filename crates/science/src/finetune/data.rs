//! Fine-tuning data: the paper's `{instruction, input, output}` records, formatted and tokenised
//! as its training code does (Alpaca template with the Input variant, + output, + the tokenizer's
//! EOS, cut at max-len), micro-batches, and transformers' learning-rate schedules.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sl_engine::text::chat::Message;
use sl_engine::{Model, PromptRecord, Template};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SftRecord {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
}

/// Reads records from a JSON array or JSONL file; every record needs `instruction` and `output`.
pub fn read_records(path: &Path) -> Result<Vec<SftRecord>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read training data {shown}"))?;
    let values: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).with_context(|| format!("{shown} is not a valid JSON array"))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{shown}:{}: not valid JSON", i + 1))
            })
            .collect::<Result<_>>()?
    };
    let records: Vec<SftRecord> = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            for field in ["instruction", "output"] {
                if !v.get(field).is_some_and(|f| f.is_string()) {
                    bail!("{shown}: record {i} has no string field `{field}`");
                }
            }
            serde_json::from_value(v).with_context(|| format!("{shown}: record {i} is malformed"))
        })
        .collect::<Result<_>>()?;
    if records.is_empty() {
        bail!("{shown}: no training records");
    }
    Ok(records)
}

/// A tokenised example and where its supervised tokens start.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub supervised_from: usize,
}

/// Tokenises a record. Alpaca: `tokenizer(prompt + output)` with special tokens, cut at
/// `max_len`, EOS appended if there is room (the paper's code; it appended Llama-3's
/// `<|eot_id|>` for every model, a defect — the tokenizer's own EOS is used here). Chat: the
/// template rendered over the user turn and the assistant's answer. With `train_on_inputs`
/// every token after the first is a target, else only the answer's.
pub fn encode(
    model: &Model,
    rec: &SftRecord,
    template: Template,
    max_len: usize,
    train_on_inputs: bool,
) -> Result<Example> {
    let tok = &model.tokenizer;
    let prompt_rec = PromptRecord {
        instruction: rec.instruction.clone(),
        input: Some(rec.input.clone()),
    };
    let prompt = template.format(&prompt_rec, tok)?;
    let (mut ids, prompt_len) = match template {
        Template::Chat => {
            let user = match rec.input.as_str() {
                "" => rec.instruction.clone(),
                inp => format!("{}\n\n{}", rec.instruction, inp),
            };
            let full = tok.apply_chat_template(
                &[
                    Message::new("user", &user),
                    Message::new("assistant", &rec.output),
                ],
                false,
            )?;
            (tok.encode(&full, false)?, tok.encode(&prompt, false)?.len())
        }
        _ => (
            tok.encode(&format!("{prompt}{}", rec.output), true)?,
            tok.encode(&prompt, true)?.len(),
        ),
    };
    ids.truncate(max_len);
    let eos = *model.eos_token_ids.first().ok_or_else(|| {
        anyhow::anyhow!("the model has no EOS token to end training examples with")
    })?;
    if template != Template::Chat && ids.last() != Some(&eos) && ids.len() < max_len {
        ids.push(eos);
    }
    let supervised_from = if train_on_inputs {
        1
    } else {
        prompt_len.min(ids.len())
    };
    Ok(Example {
        ids,
        supervised_from,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "constant" => Schedule::Constant,
            _ => bail!("unknown --lr-schedule `{s}` (expected linear, cosine or constant)"),
        })
    }
}

/// The multiplier of the base LR at optimizer step `step` (0-based), as transformers'
/// `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` (half a cycle) and
/// `get_constant_schedule_with_warmup` define it.
pub fn lr_factor(schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => {
            ((total - step.min(total)) as f64 / (total - warmup.min(total)).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / (total - warmup.min(total)).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// The order of examples in `epoch`: the identity, or a Fisher-Yates shuffle seeded by the
/// seed and the epoch (so a resumed run can recompute any epoch's order).
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng =
            crate::rng::Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() -> Result<()> {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train/schedules.json");
        let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(dir)?)?;
        assert!(cases.len() >= 9);
        for c in cases {
            let kind = match c["kind"].as_str().unwrap() {
                "constant_with_warmup" => Schedule::Constant,
                k => k.parse()?,
            };
            let (total, warmup) = (
                c["total"].as_u64().unwrap() as usize,
                c["warmup"].as_u64().unwrap() as usize,
            );
            let base = c["base_lr"].as_f64().unwrap();
            for (step, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
                let got = base * lr_factor(kind, step, total, warmup);
                assert!(
                    (got - want.as_f64().unwrap()).abs() < 1e-12,
                    "{kind:?} total {total} warmup {warmup} step {step}: {got} vs {want}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn shuffles_are_permutations_that_depend_on_seed_and_epoch() {
        let a = epoch_order(50, 7, 0, true);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(50, 7, 1, true));
        assert_ne!(a, epoch_order(50, 8, 0, true));
        assert_eq!(a, epoch_order(50, 7, 0, true));
        assert_eq!(epoch_order(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn records_need_instruction_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\":\"a\"}\n",
        )
        .unwrap();
        let e = read_records(&p).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("output"), "{e}");
        std::fs::write(&p, "[]").unwrap();
        assert!(read_records(&p)
            .unwrap_err()
            .to_string()
            .contains("no training records"));
        std::fs::write(
            &p,
            "[{\"instruction\":\"a\",\"input\":\"x\",\"output\":\"b\"}]",
        )
        .unwrap();
        assert_eq!(read_records(&p).unwrap()[0].input, "x");
    }
}
