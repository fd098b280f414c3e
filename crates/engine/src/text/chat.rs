//! Hugging Face chat templates rendered with minijinja, with the environment transformers sets
//! up: trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a
//! `tojson` that does not HTML-escape (json.dumps with ensure_ascii=False).
//!
//! A template comes with downloaded model files and is a program: a loop over `range(10**9)`, a
//! macro that calls itself or `"x" * 10**12` must end with an error, not a hang or an OOM. Each
//! render has fuel (minijinja's budget of instructions and created data), a recursion limit and
//! an output-size limit, all far above what a real chat template needs for the conversation.

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Fuel of one render beyond one unit per input byte: about a million instructions, or 64 MB of
/// created data (minijinja charges about one unit per 64 bytes). Real templates use a few
/// thousand units for a conversation.
pub const FUEL_BASE: u64 = 1_000_000;
/// Nesting depth of a render (minijinja counts 1 per loop or condition, about 10 per macro call):
/// below its own safe maximum of 500 so that renders on small thread stacks are safe too.
pub const RECURSION_LIMIT: usize = 200;
/// Stack of the render's thread: what formatting or dropping the deepest value the fuel can
/// build takes.
const RENDER_STACK: usize = 1 << 30;
/// Rendered bytes beyond four per input byte.
pub const OUTPUT_BASE: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    /// Where the template came from (a file, or a file and its field), for error messages.
    pub origin: String,
    /// Special-token strings the template may refer to (`bos_token`, `eos_token`, ...).
    pub special: Vec<(String, String)>,
}

/// Where `tojson` writes: bytes counted against a size limit and paid for with the render's
/// fuel (one unit per 64 bytes, as minijinja charges its own data), kept only when `keep`.
struct Budget<'s, 'e> {
    state: &'s State<'s, 'e>,
    out: Vec<u8>,
    keep: bool,
    len: usize,
    limit: usize,
    unpaid: usize,
    err: Option<Error>,
}

impl<'s, 'e> Budget<'s, 'e> {
    fn new(state: &'s State<'s, 'e>, limit: usize, keep: bool) -> Self {
        Budget {
            state,
            out: Vec::new(),
            keep,
            len: 0,
            limit,
            unpaid: 0,
            err: None,
        }
    }

    /// The error that stopped the writer, or `fallback` for one the serializer found.
    fn error(&mut self, fallback: impl std::fmt::Display) -> Error {
        self.err.take().unwrap_or_else(|| {
            Error::new(ErrorKind::InvalidOperation, format!("tojson: {fallback}"))
        })
    }
}

impl std::io::Write for Budget<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.len = self.len.saturating_add(buf.len());
        if self.len > self.limit {
            self.err = Some(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: the JSON passed the output limit of {} bytes",
                    self.limit
                ),
            ));
            return Err(std::io::Error::other("tojson limit"));
        }
        self.unpaid += buf.len();
        if self.unpaid >= 64 {
            if let Err(e) = self.state.consume_fuel((self.unpaid / 64) as u64) {
                self.err = Some(e);
                return Err(std::io::Error::other("tojson fuel"));
            }
            self.unpaid %= 64;
        }
        if self.keep {
            self.out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tojson` as transformers defines it. The value is measured first (a list repeated by `*`
/// holds references, and its JSON can be far larger than the data the template paid for), so
/// the JSON is never larger than the render's output limit nor its fuel.
fn tojson(
    state: &State,
    value: Value,
    kwargs: Kwargs,
    limit: usize,
) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut measure = Budget::new(state, limit, false);
    if let Err(e) = serde_json::to_writer(&mut measure, &value) {
        return Err(measure.error(e));
    }
    let mut v: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        v = sort_json(v);
    }
    let s = match indent {
        None => {
            let s = python_json_compact(&v);
            state.consume_fuel((s.len() / 64) as u64)?;
            s
        }
        Some(n) => {
            let ind = " ".repeat(n.min(limit));
            let mut buf = Budget::new(state, limit, true);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            if let Err(e) = v.serialize(&mut ser) {
                return Err(buf.error(e));
            }
            String::from_utf8(buf.out).unwrap_or_default()
        }
    };
    Ok(Value::from_safe_string(s))
}

fn sort_json(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_json(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sort_json).collect())
        }
        other => other,
    }
}

/// `json.dumps(v)` default separators: ", " and ": ".
fn python_json_compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        serde_json::to_string(k).unwrap_or_default(),
                        python_json_compact(v)
                    )
                })
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        serde_json::Value::Array(a) => {
            format!(
                "[{}]",
                a.iter()
                    .map(python_json_compact)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// chrono's `to_string` panics on an invalid format (`%Q`); `write!` reports it instead.
fn strftime_now(fmt: String) -> std::result::Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&fmt)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {fmt:?}"),
        )
    })?;
    Ok(out)
}

/// A writer that refuses to grow past `limit` bytes (minijinja then stops the render).
struct Bounded {
    out: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > self.limit {
            self.over = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    fn environment(&self, fuel: u64, limit: usize) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("jinja syntax config: {e}"))?,
        );
        env.set_fuel(Some(fuel));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter(
            "tojson",
            move |state: &State, value: Value, kwargs: Kwargs| tojson(state, value, kwargs, limit),
        );
        env.add_template("chat", &self.source)
            .map_err(|e| anyhow!("{}: chat template does not parse: {e:#}", self.origin))?;
        Ok(env)
    }

    /// The rendered conversation, as transformers' `apply_chat_template(tokenize=False)` gives it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// As `render`, with extra template variables (e.g. Qwen3's `enable_thinking`), as the
    /// keyword arguments of apply_chat_template.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        // The budgets grow with the conversation, so that a long document never hits them.
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
            + extra.values().map(|v| v.to_string().len()).sum::<usize>();
        let fuel = FUEL_BASE.saturating_add(input as u64);
        let limit = OUTPUT_BASE.saturating_add(input.saturating_mul(4));
        let env = self.environment(fuel, limit)?;
        let tmpl = env.get_template("chat")?;
        let mut ctx: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
        for (k, v) in &self.special {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        ctx.insert(
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        for (k, v) in extra {
            ctx.insert(k.clone(), Value::from(minijinja::value::Serde(v)));
        }
        let mut out = Bounded {
            out: Vec::new(),
            limit,
            over: false,
        };
        // minijinja formats and drops values recursively: a list nested 100,000 deep, which a
        // loop builds within its fuel, needs far more than a default stack. The render runs on
        // a thread whose stack (reserved, touched only as deep as it goes) covers what the fuel
        // allows.
        let rendered = std::thread::scope(|sc| {
            std::thread::Builder::new()
                .stack_size(RENDER_STACK)
                .spawn_scoped(sc, || {
                    tmpl.render_captured_to(ctx, &mut out)
                        .map(|_| ())
                        .map_err(|e| (e.kind(), format!("{e:#}")))
                })
                .map(|h| h.join())
        });
        let rendered = match rendered {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(e) => bail!(
                "{}: cannot start the chat template's thread: {e}",
                self.origin
            ),
        };
        let origin = &self.origin;
        match rendered {
            Ok(()) => String::from_utf8(out.out)
                .map_err(|_| anyhow!("{origin}: chat template rendered invalid UTF-8")),
            Err(_) if out.over => bail!(
                "{origin}: chat template stopped: its output passed the limit of {limit} bytes"
            ),
            Err((ErrorKind::OutOfFuel, _)) => bail!(
                "{origin}: chat template stopped: it ran out of fuel ({fuel} units, a loop or \
                 data far larger than a conversation needs)"
            ),
            Err((_, e)) if e.contains("recursion limit") => bail!(
                "{origin}: chat template stopped: nesting deeper than the recursion limit \
                 {RECURSION_LIMIT} (a macro calling itself?)"
            ),
            Err((_, e)) => bail!("{origin}: chat template failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str) -> Result<String> {
        let t = ChatTemplate {
            source: src.to_string(),
            origin: "dir/chat_template.jinja".into(),
            special: vec![],
        };
        t.render(&[Message::new("user", "hi")], true)
    }

    fn fails_with(src: &str, what: &str) {
        let e = format!("{:#}", render(src).unwrap_err());
        assert!(e.contains("dir/chat_template.jinja"), "{e}");
        assert!(e.contains(what), "{e}");
    }

    #[test]
    fn hostile_templates_end_with_the_limit_they_hit() {
        fails_with(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            "ran out of fuel",
        );
        fails_with(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion limit",
        );
        fails_with("{{ 'ab' * 3000000 }}", "output passed the limit");
        fails_with("{{ messages | tojson(indent=100000000) }}", "output limit");
        fails_with("{{ (messages * 100000) | tojson }}", "output limit");
        fails_with("{{ strftime_now('%Q%') }}", "invalid format");
        fails_with("{% for %}", "does not parse");
    }

    #[test]
    fn a_value_nested_100k_deep_prints() {
        let src = "{% set ns = namespace(x=1) %}{% for i in range(100000) %}\
                   {% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}";
        assert_eq!(render(src).unwrap().len(), 200_001);
    }

    /// The output as before the budget (keys sorted: serde_json's map without preserve_order).
    #[test]
    fn tojson_is_unchanged_by_its_budget() {
        let out = render("{{ messages | tojson }}|{{ messages | tojson(indent=2) }}").unwrap();
        assert_eq!(
            out,
            "[{\"content\": \"hi\", \"role\": \"user\"}]|[\n  {\n    \"content\": \"hi\",\n    \
             \"role\": \"user\"\n  }\n]"
        );
    }
}
