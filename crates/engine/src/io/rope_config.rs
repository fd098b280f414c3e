//! The rotary-embedding part of `config.json`: a base frequency and a scaling rule, from a
//! transformers-5 `rope_parameters` entry or a transformers-4 `rope_scaling` object.

use crate::io::config::{get, opt_f64, opt_usize, req_usize};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Phi-3 `longrope` (formerly `su`): per-frequency factors, long ones past the original
    /// context.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

fn f64_list(v: &Value, key: &str, file: &str) -> Result<Vec<f64>> {
    let a = get(v, key)
        .and_then(|x| x.as_array())
        .ok_or_else(|| anyhow!("{file}: rope scaling field `{key}` must be a list of numbers"))?;
    a.iter()
        .map(|x| {
            x.as_f64()
                .ok_or_else(|| anyhow!("{file}: rope scaling `{key}` holds a non-number {x}"))
        })
        .collect()
}

/// One rope description: `params` is a v5 `rope_parameters` entry or a v4 `rope_scaling` object
/// (or null), `theta` the base frequency.
pub(crate) fn parse_rope(
    params: Option<&Value>,
    theta: f64,
    top: &Value,
    file: &str,
) -> Result<RopeConfig> {
    let Some(p) = params.filter(|p| p.is_object()) else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let kind = get(p, "rope_type")
        .or_else(|| get(p, "type"))
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    let factor = opt_f64(p, "factor", file)?;
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: factor.ok_or_else(|| anyhow!("{file}: linear rope scaling needs `factor`"))?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor.ok_or_else(|| anyhow!("{file}: llama3 rope scaling needs `factor`"))?,
            low_freq_factor: opt_f64(p, "low_freq_factor", file)?.unwrap_or(1.0),
            high_freq_factor: opt_f64(p, "high_freq_factor", file)?.unwrap_or(4.0),
            original_max_position_embeddings: opt_usize(
                p,
                "original_max_position_embeddings",
                file,
            )?
            .ok_or_else(|| {
                anyhow!(
                    "{file}: llama3 rope scaling needs \
                         `original_max_position_embeddings`"
                )
            })?,
        },
        "longrope" | "su" => {
            let max_pos = req_usize(top, "max_position_embeddings", file)?;
            let orig = match opt_usize(p, "original_max_position_embeddings", file)? {
                Some(o) => o,
                None => {
                    opt_usize(top, "original_max_position_embeddings", file)?.unwrap_or(max_pos)
                }
            };
            // transformers: factor = max_position_embeddings / original_max_position_embeddings
            // when not given; attention_factor = sqrt(1 + ln(factor) / ln(original)) unless given.
            let factor = factor.unwrap_or(max_pos as f64 / orig as f64);
            let attention_factor = match opt_f64(p, "attention_factor", file)? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: f64_list(p, "short_factor", file)?,
                long_factor: f64_list(p, "long_factor", file)?,
                original_max_position_embeddings: orig,
                attention_factor,
            }
        }
        other => bail!(
            "{file}: rope scaling type {other:?} is not supported (supported: default, linear, \
             llama3, longrope/su)"
        ),
    };
    Ok(RopeConfig { theta, scaling })
}
