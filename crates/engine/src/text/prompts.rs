//! Prompt sets and prompt formats.
//!
//! Files: one prompt per line (.txt, or a single-column .csv without header), a CSV with a header
//! and a named column, or JSON / JSONL records with `instruction` and an optional `input`.
//! Formats: the paper's Alpaca template (PAPER.md, exact strings), the model's chat template, or
//! the raw text.

use crate::text::chat::Message;
use crate::text::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

pub const ALPACA: &str = "Below is an instruction that describes a task. Write a response that \
    appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";
pub const ALPACA_INPUT: &str = "Below is an instruction that describes a task, paired with an \
    input that provides further context. Write a response that appropriately completes the \
    request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromptRecord {
    pub instruction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

impl PromptRecord {
    pub fn new(instruction: &str) -> Self {
        PromptRecord {
            instruction: instruction.to_string(),
            input: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    Alpaca,
    Chat,
    Raw,
}

impl std::str::FromStr for Template {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "alpaca" => Template::Alpaca,
            "chat" => Template::Chat,
            "raw" => Template::Raw,
            _ => bail!("unknown template `{s}` (expected alpaca, chat or raw)"),
        })
    }
}

impl Template {
    pub fn name(self) -> &'static str {
        match self {
            Template::Alpaca => "alpaca",
            Template::Chat => "chat",
            Template::Raw => "raw",
        }
    }

    /// The prompt text the model sees.
    pub fn format(self, rec: &PromptRecord, tok: &Tokenizer) -> Result<String> {
        let input = rec.input.as_deref().filter(|s| !s.is_empty());
        Ok(match self {
            Template::Alpaca => match input {
                None => ALPACA.replace("{instruction}", &rec.instruction),
                Some(inp) => ALPACA_INPUT
                    .replacen("{instruction}", &rec.instruction, 1)
                    .replacen("{input}", inp, 1),
            },
            Template::Chat => {
                let content = match input {
                    None => rec.instruction.clone(),
                    Some(inp) => format!("{}\n\n{}", rec.instruction, inp),
                };
                tok.apply_chat_template(&[Message::new("user", &content)], true)?
            }
            Template::Raw => match input {
                None => rec.instruction.clone(),
                Some(inp) => format!("{}\n\n{}", rec.instruction, inp),
            },
        })
    }

    /// Token ids of a formatted prompt. A rendered chat template already holds its special tokens,
    /// so (as transformers' apply_chat_template) none are added.
    pub fn encode(self, text: &str, tok: &Tokenizer) -> Result<Vec<u32>> {
        tok.encode(text, self != Template::Chat)
    }
}

/// Reads a prompt set. `column` names the CSV column (required for CSV files with a header).
pub fn read_prompts(path: &Path, column: Option<&str>) -> Result<Vec<PromptRecord>> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read prompt file {shown}"))?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{shown}: not UTF-8 text"))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let recs = match ext.as_str() {
        "json" => {
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{shown}: invalid JSON"))?;
            let arr = v
                .as_array()
                .ok_or_else(|| anyhow!("{shown}: expected a JSON list of records"))?;
            arr.iter()
                .enumerate()
                .map(|(i, r)| record_from_json(r, column, &format!("{shown}: record {i}")))
                .collect::<Result<Vec<_>>>()?
        }
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .with_context(|| format!("{shown}: line {} is not valid JSON", i + 1))?;
                record_from_json(&v, column, &format!("{shown}: line {}", i + 1))
            })
            .collect::<Result<Vec<_>>>()?,
        "csv" => read_csv(&text, column, &shown.to_string())?,
        _ => {
            if column.is_some() {
                bail!("{shown}: --column applies to CSV, JSON and JSONL files only");
            }
            text.lines()
                .map(|l| l.trim_end_matches('\r'))
                .filter(|l| !l.trim().is_empty())
                .map(PromptRecord::new)
                .collect()
        }
    };
    if recs.is_empty() {
        bail!("{shown}: the prompt file holds no prompts");
    }
    Ok(recs)
}

fn record_from_json(v: &serde_json::Value, column: Option<&str>, at: &str) -> Result<PromptRecord> {
    if let Some(s) = v.as_str() {
        return Ok(PromptRecord::new(s));
    }
    let key = column.unwrap_or("instruction");
    let instruction = v
        .get(key)
        .and_then(|x| x.as_str())
        .ok_or_else(|| anyhow!("{at}: missing string field `{key}`"))?;
    let input = if column.is_none() {
        v.get("input").and_then(|x| x.as_str()).map(str::to_string)
    } else {
        None
    };
    Ok(PromptRecord {
        instruction: instruction.to_string(),
        input,
    })
}

fn read_csv(text: &str, column: Option<&str>, shown: &str) -> Result<Vec<PromptRecord>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(column.is_some())
        .flexible(false)
        .from_reader(text.as_bytes());
    let idx = match column {
        None => None,
        Some(c) => {
            let headers = rdr
                .headers()
                .with_context(|| format!("{shown}: cannot read the CSV header"))?;
            Some(headers.iter().position(|h| h == c).ok_or_else(|| {
                anyhow!(
                    "{shown}: no column `{c}` in the header (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                )
            })?)
        }
    };
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{shown}: malformed CSV near record {}", i + 1))?;
        let field = match idx {
            Some(k) => rec
                .get(k)
                .ok_or_else(|| anyhow!("{shown}: record {} has no column {k}", i + 1))?,
            None => {
                if rec.len() != 1 {
                    bail!(
                        "{shown}: record {} has {} columns; name one with --column (and give the \
                         file a header)",
                        i + 1,
                        rec.len()
                    );
                }
                &rec[0]
            }
        };
        if !field.trim().is_empty() {
            out.push(PromptRecord::new(field));
        }
    }
    Ok(out)
}
