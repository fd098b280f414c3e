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

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            bail!(
                "{}: tokenizer.json is missing (the tokenizer must be saved in the fast format)",
                dir.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&tj)
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
            Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
            )
        } else {
            None
        };
        Ok(Tokenizer::from_parts(
            inner,
            &tc,
            template,
            &dir.display().to_string(),
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
        Ok(Tokenizer::from_parts(inner, tokenizer_config, None, origin))
    }

    fn from_parts(
        inner: tokenizers::Tokenizer,
        tc: &Value,
        template_file: Option<String>,
        origin: &str,
    ) -> Tokenizer {
        let source = template_file.or_else(|| template_source(tc.get("chat_template")));
        let chat_template = source.map(|src| {
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
