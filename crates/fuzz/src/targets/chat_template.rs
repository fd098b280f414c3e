//! Chat templates (Jinja) as they come inside tokenizer_config.json or chat_template.jinja:
//! the real tokenizers' and the fixtures' templates, with loops, self-calling macros, huge
//! outputs and syntax errors spliced in. Each must end within its fuel, recursion and output
//! limits with an error naming the template's file.

use super::{read_seed, Ctx, Target};
use crate::mutate::Rng;
use anyhow::{Context, Result};
use sl_engine::text::chat::{ChatTemplate, Message};
use std::path::Path;

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for name in ["llama3", "qwen3", "gemma3"] {
        let p = ctx
            .shared
            .join("tokenizers")
            .join(name)
            .join("tokenizer_config.json");
        if !p.is_file() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&read_seed(&p)?)
            .with_context(|| format!("fuzz seed {}", p.display()))?;
        if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
            out.push(t.as_bytes().to_vec());
        }
    }
    out.extend(super::fixture_files(ctx, "chat_template.jinja")?);
    out.sort();
    out.dedup();
    Ok(out)
}

/// Hostile pieces of Jinja: endless or huge loops, recursion, output and data bombs, methods
/// that size their result by an argument, unbalanced syntax and deep nesting.
const SNIPPETS: &[&str] = &[
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro g(s) %}{{ g(s ~ s) }}{% endmacro %}{{ g('ab') }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{{ 'x' * 10**12 }}",
    "{{ 'ab' * 3000000 }}",
    "{{ messages * 1000000000 }}",
    "{% set s = 'x' * 100000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ range(10**9) | list }}",
    "{{ messages | tojson(indent=100000000) }}",
    "{{ 'x'.center(10**9) }}",
    "{{ 'x'.ljust(10**12) }}",
    "{{ 'x' | indent(10**9) }}",
    "{{ 'a b c' * 1000000 | wordcount }}",
    "{{ 'abc'.split('') }}",
    "{{ strftime_now('%Q%') }}",
    "{{ strftime_now('%Y' * 100000) }}",
    "{{ raise_exception('hostile') }}",
    "{{ messages[10**18] }}",
    "{{ 10**10**10 }}",
    "{{ 1 // 0 }}",
    "{{ 1 % 0 }}",
    "{{ (2**63) * 2 }}",
    "{%",
    "{{",
    "{% endfor %}",
    "{% if %}",
    "{% macro %}",
    "{% for %}",
    "}}",
    "{#",
];

fn nested(rng: &mut Rng) -> String {
    let n = 1 + rng.below(2000);
    let (open, close) = match rng.below(4) {
        0 => ("(", ")"),
        1 => ("[", "]"),
        2 => ("{% if true %}", "{% endif %}"),
        _ => ("{% for i in [1] %}", "{% endfor %}"),
    };
    let inner = if open.starts_with("{%") { "x" } else { "1" };
    let body = format!("{}{inner}{}", open.repeat(n), close.repeat(n));
    if open.starts_with("{%") {
        body
    } else {
        format!("{{{{ {body} }}}}")
    }
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(2) {
        let piece = if rng.below(4) == 0 {
            nested(rng)
        } else {
            SNIPPETS[rng.below(SNIPPETS.len())].to_string()
        };
        // At a random position or replacing a random span: inside a loop, a macro or a tag.
        let at = rng.below(v.len() + 1);
        let cut = if rng.below(3) == 0 {
            rng.below((v.len() - at).min(64) + 1)
        } else {
            0
        };
        v.splice(at..at + cut, piece.bytes());
    }
    Some(v)
}

fn run(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let source = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))?;
    let t = ChatTemplate {
        source,
        origin: path.display().to_string(),
        special: vec![
            ("bos_token".into(), "<s>".into()),
            ("eos_token".into(), "</s>".into()),
        ],
    };
    let messages = [
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "Hello! How are you?"),
        Message::new("assistant", "<think>\nfine\n</think>\n\nI am fine."),
        Message::new("user", "Tell me a joke."),
    ];
    t.render(&messages, true)?;
    Ok(())
}

pub fn target() -> Target {
    Target {
        name: "chat-template",
        file_name: "chat_template.jinja",
        seeds,
        mutate: Some(mutate),
        run,
        // Fuel bounds the data a render creates to about 64 MB.
        mem_base: 160 << 20,
        mem_factor: 64,
        max_len: 1 << 16,
    }
}
