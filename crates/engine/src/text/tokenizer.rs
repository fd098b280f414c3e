//! A Hugging Face tokenizer (tokenizer.json) with its special tokens and chat template
//! (tokenizer_config.json, or a separate chat_template.jinja as newer repositories ship it).

use crate::text::chat::{ChatTemplate, Message};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<ChatTemplate>,
    pub origin: String,
}

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// `chat_template` may be a string or a list of `{name, template}` (the `default` one is used).
fn template_source(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let pick = list
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        }
        _ => None,
    }
}

/// Deepest nesting accepted in tokenizer.json (real ones nest about 6 deep).
const MAX_DEPTH: usize = 32;

/// The deepest nesting of arrays and objects in JSON text (strings skipped).
fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in text {
        if in_str {
            match b {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// tokenizers' BPE copies each merge's two parts into a buffer as long as the longest token
/// before it looks the result up, and cuts `continuing_subword_prefix` off the second part
/// without checking that it starts with it: a merge whose result is not a token (or whose
/// second part lacks the prefix) overflows. Each merge is checked first, as tokenizers would
/// after the copy.
fn check_merges(text: &str, prefix: &str, file: &str) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Doc {
        model: Bpe,
    }
    #[derive(serde::Deserialize)]
    struct Bpe {
        vocab: std::collections::HashMap<String, serde::de::IgnoredAny>,
        #[serde(default)]
        merges: Vec<Value>,
    }
    let Ok(doc) = serde_json::from_str::<Doc>(text) else {
        return Ok(()); // not a BPE layout: tokenizers reports it
    };
    for (i, m) in doc.model.merges.iter().enumerate() {
        let (a, b) = match m {
            Value::String(s) => match s.split_once(' ') {
                Some(p) => p,
                None => continue,
            },
            Value::Array(p) => match (
                p.first().and_then(|a| a.as_str()),
                p.get(1).and_then(|b| b.as_str()),
            ) {
                (Some(a), Some(b)) => (a, b),
                _ => continue,
            },
            _ => continue,
        };
        let Some(rest) = b.strip_prefix(prefix) else {
            bail!(
                "{file}: field model.merges[{i}]: {b:?} does not start with \
                 model.continuing_subword_prefix {prefix:?}"
            );
        };
        if !doc.model.vocab.contains_key(&format!("{a}{rest}")) {
            bail!("{file}: field model.merges[{i}]: {a:?} + {b:?} is not in model.vocab");
        }
    }
    Ok(())
}

/// Every special token a `TemplateProcessing` (alone or in a `Sequence`) places must be one of
/// its `special_tokens`: tokenizers looks it up without checking.
fn check_post_processor(pp: &Value, file: &str) -> Result<()> {
    match pp.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in pp
                .get("processors")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
            {
                check_post_processor(p, file)?;
            }
        }
        Some("TemplateProcessing") => {
            let defined = pp.get("special_tokens").and_then(|s| s.as_object());
            for key in ["single", "pair"] {
                let pieces = pp.get(key).and_then(|s| s.as_array()).into_iter().flatten();
                for id in pieces.filter_map(|p| p.get("SpecialToken")?.get("id")) {
                    let id = id.as_str().unwrap_or_default();
                    let entry = defined.and_then(|d| d.get(id));
                    // Its ids and tokens are zipped when encoding: both must be lists.
                    let ok = entry.is_some_and(|e| {
                        e.get("ids").is_some_and(|x| x.is_array())
                            && e.get("tokens").is_some_and(|x| x.is_array())
                    });
                    if !ok {
                        bail!(
                            "{file}: field post_processor.{key} names special token {id:?}, which \
                             post_processor.special_tokens does not define"
                        );
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            bail!(
                "{}: tokenizer.json is missing (the tokenizer must be saved in the fast format)",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&tj)
            .with_context(|| format!("cannot read {}", tj.display()))?;
        // tokenizers panics on some malformed JSON (a syntax error or nesting past serde_json's
        // limit inside a component it parses untagged) and, when encoding, on a template
        // post-processor naming a special token it does not define; a first pass over the text
        // finds those, keeping only the post-processor.
        #[derive(serde::Deserialize)]
        struct Check {
            #[serde(default)]
            post_processor: Option<Value>,
            #[serde(default)]
            model: Option<ModelHead>,
        }
        #[derive(serde::Deserialize)]
        struct ModelHead {
            #[serde(default)]
            continuing_subword_prefix: Option<Value>,
        }
        let check: Check = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", tj.display()))?;
        // Components are parsed through serde's untagged buffering, which nests again: a deep
        // `decoder` passes serde_json's limit there, and tokenizers unwraps that error.
        let depth = json_depth(text.as_bytes());
        if depth > MAX_DEPTH {
            bail!(
                "{}: JSON nested {depth} deep, more than the {MAX_DEPTH} a tokenizer needs",
                tj.display()
            );
        }
        if let Some(pp) = &check.post_processor {
            check_post_processor(pp, &tj.display().to_string())?;
        }
        let prefix = check
            .model
            .and_then(|m| m.continuing_subword_prefix)
            .and_then(|p| p.as_str().map(str::to_string))
            .unwrap_or_default();
        check_merges(&text, &prefix, &tj.display().to_string())?;
        let inner: tokenizers::Tokenizer = std::str::FromStr::from_str(&text)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tj.display()))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = if tc_path.exists() {
            let text = std::fs::read_to_string(&tc_path)
                .with_context(|| format!("cannot read {}", tc_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", tc_path.display()))?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some((
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
                jinja.display().to_string(),
            ))
        } else {
            None
        };
        Ok(Tokenizer::from_parts(
            inner,
            &tc,
            template,
            &tj.display().to_string(),
            &format!("{} (field chat_template)", tc_path.display()),
        ))
    }

    /// From a `tokenizer.json` value and a `tokenizer_config.json` value (e.g. rebuilt from GGUF).
    pub fn from_json(
        tokenizer_json: &Value,
        tokenizer_config: &Value,
        origin: &str,
    ) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = std::str::FromStr::from_str(&tokenizer_json.to_string())
            .map_err(|e| anyhow!("{origin}: cannot build the tokenizer: {e}"))?;
        Ok(Tokenizer::from_parts(
            inner,
            tokenizer_config,
            None,
            origin,
            &format!("{origin} (chat_template)"),
        ))
    }

    fn from_parts(
        inner: tokenizers::Tokenizer,
        tc: &Value,
        template_file: Option<(String, String)>,
        origin: &str,
        config_template_origin: &str,
    ) -> Tokenizer {
        // A chat_template.jinja beside the config wins, as in transformers.
        let source = template_file.or_else(|| {
            template_source(tc.get("chat_template"))
                .map(|s| (s, config_template_origin.to_string()))
        });
        let chat_template = source.map(|(src, template_origin)| {
            let special = [
                "bos_token",
                "eos_token",
                "unk_token",
                "pad_token",
                "sep_token",
                "cls_token",
                "mask_token",
            ]
            .iter()
            .filter_map(|key| token_string(tc.get(*key)).map(|s| (key.to_string(), s)))
            .collect();
            ChatTemplate {
                source: src,
                origin: template_origin,
                special,
            }
        });
        Tokenizer {
            inner,
            bos_token: token_string(tc.get("bos_token")),
            eos_token: token_string(tc.get("eos_token")),
            chat_template,
            origin: origin.to_string(),
        }
    }

    /// Token ids as transformers' tokenizer(text) gives them (`add_special_tokens` adds BOS
    /// where the tokenizer's post-processor does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("{}: tokenization failed: {e}", self.origin))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("{}: decoding failed: {e}", self.origin))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    pub fn apply_chat_template_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: the tokenizer has no chat template (use --template alpaca or raw)",
                self.origin
            )
        })?;
        t.render_with(messages, add_generation_prompt, extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_depth_skips_strings() {
        assert_eq!(json_depth(br#"{"a": [1, {"b": "[[[{"}], "c\"[": 2}"#), 3);
    }

    #[test]
    fn a_template_special_token_must_be_defined() {
        let pp = json!({"type": "Sequence", "processors": [{
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<t>": {"id": "<t>", "ids": [1], "tokens": ["<t>"]}}
        }]});
        let e = check_post_processor(&pp, "x/tokenizer.json").unwrap_err();
        assert!(e
            .to_string()
            .contains("x/tokenizer.json: field post_processor.single"));
    }
}
