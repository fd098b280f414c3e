//! Utility on held-out fine-tuning records: Rouge-L F1 of greedy responses against the
//! references (rouge.rs), and the mean token perplexity of the references given the prompts,
//! teacher-forced (no generation): exp(sum of -log p(reference token | prompt, earlier
//! reference tokens) / number of reference tokens), over all held-out records together. The
//! reference tokens are the reference text only (no EOS appended).

use crate::eval::rouge::{rouge_l, RougeScore};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sl_engine::infer::generate::left_pad;
use sl_engine::{Decoder, Logits, Model, PromptRecord, Template};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Take {
    First,
    Last,
}

impl std::str::FromStr for Take {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Take> {
        match s {
            "first" => Ok(Take::First),
            "last" => Ok(Take::Last),
            _ => bail!("--utility-take `{s}`: expected first or last"),
        }
    }
}

/// One record of a fine-tuning set: instruction, optional input, reference output.
#[derive(Debug, Clone, PartialEq)]
pub struct UtilityRecord {
    /// Position in the file (0-based), so a held-out record can be found again.
    pub index: usize,
    pub instruction: String,
    pub input: Option<String>,
    pub reference: String,
}

/// The held-out records of a fine-tuning set.
#[derive(Debug, Clone)]
pub struct UtilitySet {
    pub name: String,
    pub sha256: String,
    pub total: usize,
    pub take: Take,
    pub records: Vec<UtilityRecord>,
}

/// Records of a JSON list or JSONL file with string fields `instruction`, `output` and an
/// optional `input` (the Alpaca layout of the paper's D_N and D_I).
pub fn read_records(path: &Path) -> Result<Vec<UtilityRecord>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read utility set {shown}"))?;
    let values: Vec<(String, serde_json::Value)> = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
    {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                Ok((
                    format!("line {}", i + 1),
                    serde_json::from_str(l)
                        .with_context(|| format!("{shown}: line {} is not valid JSON", i + 1))?,
                ))
            })
            .collect::<Result<_>>()?
    } else {
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{shown}: invalid JSON"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| anyhow!("{shown}: expected a JSON list of records"))?;
        arr.iter()
            .enumerate()
            .map(|(i, r)| (format!("record {i}"), r.clone()))
            .collect()
    };
    values
        .into_iter()
        .enumerate()
        .map(|(index, (at, v))| {
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| anyhow!("{shown}: {at} has no string field `{k}`"))
            };
            Ok(UtilityRecord {
                index,
                instruction: field("instruction")?.to_string(),
                input: v
                    .get("input")
                    .and_then(|x| x.as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                reference: field("output")?.to_string(),
            })
        })
        .collect()
}

impl UtilitySet {
    /// The `n` records that fine-tuning holds out: the last n of the file (or the first n).
    pub fn held_out(
        name: &str,
        sha256: &str,
        all: Vec<UtilityRecord>,
        n: usize,
        take: Take,
    ) -> Result<UtilitySet> {
        let total = all.len();
        if n == 0 {
            bail!("--utility-n 0: the utility set would be empty");
        }
        if total == 0 {
            bail!("the utility set `{name}` holds no records");
        }
        if n > total {
            bail!("--utility-n {n}: the utility set `{name}` holds only {total} records");
        }
        let records = match take {
            Take::First => all.into_iter().take(n).collect(),
            Take::Last => all.into_iter().skip(total - n).collect(),
        };
        Ok(UtilitySet {
            name: name.to_string(),
            sha256: sha256.to_string(),
            total,
            take,
            records,
        })
    }

    pub fn describe(&self) -> serde_json::Value {
        let (first, last) = (
            self.records.first().map(|r| r.index),
            self.records.last().map(|r| r.index),
        );
        serde_json::json!({
            "name": self.name,
            "sha256": self.sha256,
            "records_in_set": self.total,
            "held_out": {
                "rule": format!(
                    "the {} {} records of the set (the records fine-tuning holds out)",
                    match self.take { Take::First => "first", Take::Last => "last" },
                    self.records.len()
                ),
                "take": self.take,
                "n": self.records.len(),
                "first_index": first,
                "last_index": last,
            },
            "rouge_l": "F1 of the longest common token subsequence; rouge-score's tokenisation: \
                        lower-cased, tokens are runs of ASCII a-z0-9 (punctuation, whitespace, \
                        other characters separate), no stemming; mean over records",
            "perplexity": "exp(total NLL / total tokens) of the reference tokens given the \
                           formatted prompt, teacher-forced; reference text only, no EOS",
        })
    }
}

/// One held-out record's response and scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UtilityResponse {
    pub index: usize,
    pub instruction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub reference: String,
    pub response: String,
    #[serde(default)]
    pub output_ids: Vec<u32>,
    #[serde(default)]
    pub stop: String,
    /// Recomputed from response and reference whenever responses are read back.
    #[serde(default = "zero_rouge")]
    pub rouge_l: RougeScore,
    /// Reference tokens scored (after any truncation to the context).
    pub reference_tokens: usize,
    /// Sum of -log p over those tokens (natural log).
    pub nll: f64,
    pub truncated: bool,
}

fn zero_rouge() -> RougeScore {
    RougeScore::ZERO
}

/// Log-probability of each target token given the prompt and the targets before it, and whether
/// it was the model's top choice. Rows are batched by length, at most `max_batch_tokens`
/// positions per forward pass (a row longer than that runs alone), so the `[B, T, vocab]`
/// logits stay bounded.
pub fn target_logprobs(
    dec: &Decoder,
    rows: &[(Vec<u32>, Vec<u32>)],
    max_batch_tokens: usize,
) -> Result<Vec<Vec<(f64, bool)>>> {
    if let Some(i) = rows.iter().position(|r| r.0.is_empty()) {
        bail!("row {i}: an empty prompt gives no position to predict the first target from");
    }
    let mut out = vec![Vec::new(); rows.len()];
    let mut order: Vec<usize> = (0..rows.len()).filter(|&i| !rows[i].1.is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].0.len() + rows[i].1.len()));
    let mut start = 0;
    while start < order.len() {
        // Sorted longest first: the batch's width is its first row's length.
        let width = rows[order[start]].0.len() + rows[order[start]].1.len();
        let fit = (max_batch_tokens / width.max(1)).max(1);
        let batch = &order[start..(start + fit).min(order.len())];
        start += batch.len();
        let seqs: Vec<Vec<u32>> = batch
            .iter()
            .map(|&i| [rows[i].0.as_slice(), rows[i].1.as_slice()].concat())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let (ids, pads) = left_pad(&refs, &dec.device)?;
        let logits = sl_engine::kernels::on_workers(|| dec.logits(&ids, &pads, None, Logits::All))?;
        for (b, &i) in batch.iter().enumerate() {
            let (p, t) = (rows[i].0.len(), &rows[i].1);
            // The logits at position k predict token k + 1.
            let rows_lp = logits
                .get(b)?
                .narrow(0, pads[b] + p - 1, t.len())?
                .to_vec2::<f32>()?;
            out[i] = rows_lp
                .iter()
                .zip(t)
                .map(|(lg, &tok)| log_softmax_at(lg, tok))
                .collect();
        }
    }
    Ok(out)
}

/// log softmax(logits)[tok] in f64, and whether `tok` is the first maximum (greedy's choice).
fn log_softmax_at(logits: &[f32], tok: u32) -> (f64, bool) {
    let top = sl_engine::infer::generate::argmax(logits);
    let max = logits[top as usize] as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    (logits[tok as usize] as f64 - max - z.ln(), top == tok)
}

/// Reference token ids after the prompt: the tokens of prompt + reference past the prompt's own
/// tokens when tokenising them together keeps the prompt's tokens (as training sees the text),
/// else the reference tokenised alone.
fn reference_ids(
    model: &Model,
    prompt: &sl_engine::Prompt,
    reference: &str,
    template: Template,
) -> Result<Vec<u32>> {
    if reference.is_empty() {
        return Ok(vec![]);
    }
    let full = template.encode(&format!("{}{}", prompt.text, reference), &model.tokenizer)?;
    if full.len() > prompt.ids.len() && full.starts_with(&prompt.ids) {
        return Ok(full[prompt.ids.len()..].to_vec());
    }
    model.tokenizer.encode(reference, false)
}

#[derive(Debug, Clone)]
pub struct UtilityOptions {
    pub template: Template,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub max_batch_tokens: usize,
}

/// Greedy responses, Rouge-L and teacher-forced reference NLL for every held-out record.
pub fn evaluate(
    model: &Model,
    set: &UtilitySet,
    opts: &UtilityOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<UtilityResponse>> {
    if set.records.is_empty() {
        bail!("the utility set `{}` is empty", set.name);
    }
    let recs: Vec<PromptRecord> = set
        .records
        .iter()
        .map(|r| PromptRecord {
            instruction: r.instruction.clone(),
            input: r.input.clone(),
        })
        .collect();
    let (prompts, gens) = crate::eval::respond(
        model,
        &set.name,
        &recs,
        (opts.template, opts.max_new_tokens, opts.batch_size),
        &[],
        progress,
    )?;

    let ctx = model.cfg().max_position_embeddings;
    let mut rows = Vec::with_capacity(prompts.len());
    let mut truncated = Vec::with_capacity(prompts.len());
    for (p, r) in prompts.iter().zip(&set.records) {
        let mut t = reference_ids(model, p, &r.reference, opts.template)?;
        let room = ctx - p.ids.len();
        truncated.push(t.len() > room);
        t.truncate(room);
        rows.push((p.ids.clone(), t));
    }
    let lps = target_logprobs(&model.decoder, &rows, opts.max_batch_tokens)?;

    let mut out = Vec::with_capacity(gens.len());
    for (((r, gen), lp), tr) in set.records.iter().zip(gens).zip(lps).zip(truncated) {
        let response = model.tokenizer.decode(&gen.ids, true)?;
        out.push(UtilityResponse {
            index: r.index,
            instruction: r.instruction.clone(),
            input: r.input.clone(),
            reference: r.reference.clone(),
            rouge_l: rouge_l(&response, &r.reference),
            response,
            output_ids: gen.ids,
            stop: serde_json::to_value(gen.stop)?
                .as_str()
                .unwrap_or_default()
                .to_string(),
            reference_tokens: lp.len(),
            nll: -lp.iter().map(|(l, _)| l).sum::<f64>(),
            truncated: tr,
        });
    }
    Ok(out)
}

/// The utility columns of a model's row.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct UtilitySummary {
    pub records: usize,
    pub rouge_l_f1: f64,
    pub rouge_l_precision: f64,
    pub rouge_l_recall: f64,
    /// None when no reference has a token.
    pub perplexity: Option<f64>,
    pub mean_nll: Option<f64>,
    pub reference_tokens: usize,
    pub truncated_references: usize,
}

pub fn summarise(rs: &[UtilityResponse]) -> Result<UtilitySummary> {
    if rs.is_empty() {
        bail!("the utility set has no responses");
    }
    let n = rs.len() as f64;
    let mean = |f: fn(&RougeScore) -> f64| rs.iter().map(|r| f(&r.rouge_l)).sum::<f64>() / n;
    let tokens: usize = rs.iter().map(|r| r.reference_tokens).sum();
    let nll: f64 = rs.iter().map(|r| r.nll).sum();
    let mean_nll = (tokens > 0).then(|| nll / tokens as f64);
    Ok(UtilitySummary {
        records: rs.len(),
        rouge_l_f1: mean(|s| s.f1),
        rouge_l_precision: mean(|s| s.precision),
        rouge_l_recall: mean(|s| s.recall),
        perplexity: mean_nll.map(f64::exp),
        mean_nll,
        reference_tokens: tokens,
        truncated_references: rs.iter().filter(|r| r.truncated).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> UtilityRecord {
        UtilityRecord {
            index: i,
            instruction: format!("q{i}"),
            input: None,
            reference: format!("a{i}"),
        }
    }

    #[test]
    fn held_out_takes_the_end_by_default() {
        let all: Vec<_> = (0..10).map(rec).collect();
        let s = UtilitySet::held_out("d", "x", all.clone(), 3, Take::Last).unwrap();
        assert_eq!(
            s.records.iter().map(|r| r.index).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        let d = s.describe();
        assert_eq!(
            (
                d["held_out"]["first_index"].as_u64(),
                d["held_out"]["last_index"].as_u64()
            ),
            (Some(7), Some(9))
        );
        let s = UtilitySet::held_out("d", "x", all.clone(), 2, Take::First).unwrap();
        assert_eq!(
            s.records.iter().map(|r| r.index).collect::<Vec<_>>(),
            [0, 1]
        );
        assert!(UtilitySet::held_out("d", "x", all.clone(), 0, Take::Last)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(UtilitySet::held_out("d", "x", all, 11, Take::Last)
            .unwrap_err()
            .to_string()
            .contains("only 10"));
        assert!(UtilitySet::held_out("d", "x", vec![], 1, Take::Last).is_err());
    }

    #[test]
    fn log_softmax_by_hand() {
        let (lp, top) = log_softmax_at(&[0.0, 0.0, 0.0, 0.0], 2);
        assert!(
            (lp - (0.25f64).ln()).abs() < 1e-12 && !top,
            "ties: the first maximum is greedy's"
        );
        let (lp, top) = log_softmax_at(&[1.0, 3.0], 1);
        assert!((lp - (3f64.exp() / (1f64.exp() + 3f64.exp())).ln()).abs() < 1e-12 && top);
    }

    #[test]
    fn summary_by_hand() {
        let r = |f1: f64, tokens: usize, nll: f64| UtilityResponse {
            index: 0,
            instruction: String::new(),
            input: None,
            reference: String::new(),
            response: String::new(),
            output_ids: vec![],
            stop: "eos".into(),
            rouge_l: RougeScore {
                precision: f1,
                recall: f1,
                f1,
            },
            reference_tokens: tokens,
            nll,
            truncated: false,
        };
        let s = summarise(&[r(0.5, 2, 2.0), r(1.0, 6, 2.0)]).unwrap();
        assert_eq!(s.rouge_l_f1, 0.75);
        assert_eq!(
            s.mean_nll,
            Some(0.5),
            "token-weighted: 4 nats over 8 tokens"
        );
        assert!((s.perplexity.unwrap() - 0.5f64.exp()).abs() < 1e-12);
        assert_eq!(summarise(&[r(0.0, 0, 0.0)]).unwrap().perplexity, None);
        assert!(summarise(&[]).is_err());
    }
}
