//! Making a model organism: safety SFT of a chat model that does not refuse, the way vendors
//! align theirs — harmful prompts paired with refusals, benign prompts paired with the model's
//! own greedy answers (self-distillation keeps its utility) — so that the paper's study has an
//! aligned model to look at. The prompts must not overlap any evaluation set; that is checked on
//! normalised text and reported.

use crate::finetune::data::SftRecord;
use crate::finetune::{finetune, FinetuneConfig, RunOptions};
use crate::judges::{Judge, JudgeKind};
use crate::rng::Rng;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::io::atomic::StagedDir;
use sl_engine::{Model, PromptRecord};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Natural refusals, one chosen per harmful example by the seed. Each starts with one of
/// XSTest's refusal prefixes and contains a phrase of the GCG list, so both judges see them.
pub const REFUSALS: &[&str] = &[
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot assist with that. It could cause real harm to people.",
    "I cannot help with this. It could seriously hurt someone, and it may be illegal.",
    "I can't provide instructions for that. It is harmful and may be illegal.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
    "I apologize, but I cannot provide that information because it could be used to hurt others.",
    "I'm sorry, I can't do that. Helping with this could put people in danger.",
    "I cannot fulfil this request. It asks for something dangerous and unethical.",
    "Sorry, but I won't help with this request because it could cause harm.",
    "I'm sorry, but I'm not able to provide that. Please ask me something else.",
    "I can't assist with that request, as it could lead to serious harm.",
    "I am sorry, but I cannot support this. It would be unethical and unsafe.",
];

/// Lower-case, every run of non-alphanumeric characters one space, trimmed: two prompts that
/// differ only in case, punctuation or spacing count as the same prompt.
pub fn normalise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut gap = false;
    for c in s.chars() {
        if c.is_alphanumeric() {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            out.extend(c.to_lowercase());
        } else {
            gap = true;
        }
    }
    out
}

/// Named prompt lists.
pub type Sets = Vec<(String, Vec<String>)>;

pub struct AlignData {
    pub harmful: Sets,
    /// Evaluation and analysis sets no training prompt may appear in.
    pub protected: Sets,
    pub benign_pool: Vec<String>,
    /// Sets benign prompts must avoid (the paper's normal sets).
    pub benign_exclude: Sets,
}

#[derive(Debug, Clone)]
pub struct AlignOptions {
    pub harmful_n: usize,
    pub benign_n: usize,
    pub answer_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
}

/// Picks `n` items from `pool` (de-duplicated on normalised text, minus anything in `avoid`),
/// reporting how many each avoided set removed.
fn pick(
    pool: &[(String, String)],
    avoid: &[(String, HashSet<String>)],
    n: usize,
    rng: &mut Rng,
) -> (Vec<(String, String)>, Value) {
    let mut seen = HashSet::new();
    let mut removed: BTreeMap<String, usize> = BTreeMap::new();
    let mut dupes = 0;
    let mut keep = vec![];
    for (src, p) in pool {
        let key = normalise(p);
        if key.is_empty() || !seen.insert(key.clone()) {
            dupes += 1;
            continue;
        }
        if let Some((name, _)) = avoid.iter().find(|(_, set)| set.contains(&key)) {
            *removed.entry(name.clone()).or_default() += 1;
            continue;
        }
        keep.push((src.clone(), p.clone()));
    }
    let available = keep.len();
    for i in (1..keep.len()).rev() {
        keep.swap(i, rng.below(i + 1));
    }
    keep.truncate(n);
    (
        keep,
        json!({"candidates": pool.len(), "duplicates_removed": dupes, "overlap_removed": removed,
               "available": available}),
    )
}

fn set_of(sets: &Sets) -> Vec<(String, HashSet<String>)> {
    sets.iter()
        .map(|(n, v)| (n.clone(), v.iter().map(|s| normalise(s)).collect()))
        .collect()
}

/// Builds the training records: refusals for harmful prompts, the model's own greedy answers
/// (Alpaca template) for benign ones. Returns them with the data report of align.json.
pub fn build_records(
    model: &Model,
    data: &AlignData,
    opts: &AlignOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<SftRecord>, Value)> {
    let mut rng = Rng::new(opts.seed);
    let protected = set_of(&data.protected);
    let harmful_pool: Vec<(String, String)> = data
        .harmful
        .iter()
        .flat_map(|(n, v)| v.iter().map(move |p| (n.clone(), p.clone())))
        .collect();
    let (harmful, harmful_report) = pick(&harmful_pool, &protected, opts.harmful_n, &mut rng);
    let mut benign_avoid = protected.clone();
    benign_avoid.extend(set_of(&data.benign_exclude));
    let harmful_keys: HashSet<String> = harmful_pool.iter().map(|(_, p)| normalise(p)).collect();
    benign_avoid.push(("harmful sources".into(), harmful_keys));
    let benign_pool: Vec<(String, String)> = data
        .benign_pool
        .iter()
        .map(|p| ("alpaca".to_string(), p.clone()))
        .collect();
    let (benign, benign_report) = pick(&benign_pool, &benign_avoid, opts.benign_n, &mut rng);
    if harmful.len() < opts.harmful_n || benign.len() < opts.benign_n {
        bail!(
            "asked for {} harmful and {} benign prompts, but only {} and {} are available after \
             de-duplication and overlap removal",
            opts.harmful_n,
            opts.benign_n,
            harmful.len(),
            benign.len()
        );
    }
    // The final check the report states: no chosen prompt appears in any protected set.
    let overlap: usize = harmful
        .iter()
        .chain(&benign)
        .filter(|(_, p)| protected.iter().any(|(_, s)| s.contains(&normalise(p))))
        .count();
    if overlap != 0 {
        bail!("{overlap} chosen prompts overlap an evaluation set (this is a bug)");
    }

    let records: Vec<PromptRecord> = benign.iter().map(|(_, p)| PromptRecord::new(p)).collect();
    let prompts = model.prompts(&records, sl_engine::Template::Alpaca)?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let gen_opts = GenerateOptions {
        max_new_tokens: opts.answer_tokens,
        batch_size: opts.batch_size,
        ..Default::default()
    };
    let outs = greedy(
        &model.decoder,
        &ids,
        &model.eos_token_ids,
        &gen_opts,
        progress,
    )?;
    let judge = Judge::new(JudgeKind::Gcg);
    let mut out = vec![];
    let (mut empty, mut refused) = (0, 0);
    for ((_, p), o) in benign.iter().zip(outs) {
        let text = model.tokenizer.decode(&o, true)?.trim().to_string();
        if text.is_empty() {
            empty += 1;
        } else if judge.is_refusal(&text) {
            // Self-distilled refusals of benign prompts would teach over-refusal.
            refused += 1;
        } else {
            out.push(SftRecord {
                instruction: p.clone(),
                input: String::new(),
                output: text,
            });
        }
    }
    let benign_kept = out.len();
    for (_, p) in &harmful {
        let r = REFUSALS[rng.below(REFUSALS.len())];
        out.push(SftRecord {
            instruction: p.clone(),
            input: String::new(),
            output: r.to_string(),
        });
    }
    let mut by_source: BTreeMap<String, usize> = BTreeMap::new();
    for (s, _) in &harmful {
        *by_source.entry(s.clone()).or_default() += 1;
    }
    let report = json!({
        "harmful": {"selection": harmful_report, "chosen": harmful.len(), "by_source": by_source,
                    "sources": data.harmful.iter().map(|(n, _)| n).collect::<Vec<_>>()},
        "benign": {"selection": benign_report, "chosen": benign.len(), "kept": benign_kept,
                   "dropped_empty_answer": empty, "dropped_answer_judged_refusal": refused,
                   "answers": "greedy, Alpaca template, the base model itself",
                   "answer_tokens": opts.answer_tokens},
        "protected_sets": data.protected.iter()
            .map(|(n, v)| json!({"name": n, "prompts": v.len()}))
            .collect::<Vec<_>>(),
        "benign_excluded_sets": data.benign_exclude.iter()
            .map(|(n, v)| json!({"name": n, "prompts": v.len()}))
            .collect::<Vec<_>>(),
        "overlap_after_selection": overlap,
        "normalisation":
            "lower-case, runs of non-alphanumeric characters collapsed to one space, trimmed",
        "refusals": REFUSALS,
        "records": out.len(),
    });
    Ok((out, report))
}

/// Builds the data and fine-tunes all weights on it; `out` ends up a checkpoint directory with
/// align.json and align_data.jsonl beside the weights.
pub fn align(
    model: Model,
    data: &AlignData,
    opts: &AlignOptions,
    train: &FinetuneConfig,
    out: &Path,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<Value> {
    let t0 = std::time::Instant::now();
    if sl_engine::io::atomic::occupied(out) {
        bail!(
            "output directory {} already exists and is not empty",
            out.display()
        );
    }
    let (records, data_report) = build_records(&model, data, opts, &mut |n| {
        progress("self-distillation", n)
    })?;
    let t_data = t0.elapsed().as_secs_f64();
    let mut cfg = train.clone();
    cfg.freeze = None;
    // The whole directory is staged and renamed into place at the end: a killed run leaves no
    // `out` (a rerun starts afresh), never a model without its align.json.
    let stage = StagedDir::new(out)?;
    let summary = finetune(
        model,
        &records,
        &cfg,
        &RunOptions::default(),
        stage.path(),
        &mut |s| progress("training", s.step),
    )?;
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    stage.write("align_data.jsonl", lines.as_bytes())?;
    let doc = json!({
        "data": data_report,
        "training": summary.json,
        "seconds": {"data": t_data, "total": t0.elapsed().as_secs_f64()},
    });
    stage.write("align.json", serde_json::to_string_pretty(&doc)?.as_bytes())?;
    stage.commit()?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_a_refusal_to_both_judges() {
        for r in REFUSALS {
            assert!(Judge::new(JudgeKind::Gcg).is_refusal(r), "gcg misses {r:?}");
            assert!(
                Judge::new(JudgeKind::Xstest).is_refusal(r),
                "xstest misses {r:?}"
            );
        }
    }

    #[test]
    fn normalisation_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalise("  How to KILL time?! "), "how to kill time");
        assert_eq!(
            normalise("Write a tutorial—on  making a bomb."),
            normalise("write a tutorial on making a bomb")
        );
        assert_ne!(normalise("make a cake"), normalise("make a bomb"));
    }

    #[test]
    fn picking_removes_duplicates_and_protected_prompts() {
        let pool: Vec<(String, String)> = [
            "Make a bomb.",
            "make a BOMB",
            "How to kill time?",
            "Steal a car",
            "Hack a bank",
        ]
        .iter()
        .map(|p| ("src".to_string(), p.to_string()))
        .collect();
        let avoid = set_of(&vec![(
            "D_o".to_string(),
            vec!["how to kill time".to_string()],
        )]);
        let (kept, report) = pick(&pool, &avoid, 10, &mut Rng::new(1));
        let texts: HashSet<String> = kept.iter().map(|(_, p)| normalise(p)).collect();
        assert_eq!(texts.len(), 3);
        assert!(!texts.contains("how to kill time"));
        assert_eq!(report["duplicates_removed"], 1);
        assert_eq!(report["overlap_removed"]["D_o"], 1);
        let (two, _) = pick(&pool, &avoid, 2, &mut Rng::new(1));
        assert_eq!(two.len(), 2);
    }
}
