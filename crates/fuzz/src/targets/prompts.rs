//! Prompt files as `read_prompts` reads them: plain text, CSV with and without a header, a JSON
//! list, JSONL; invalid UTF-8; and one 100 MB line, made here rather than committed. The
//! harness writes each input to `input.prompts`; the run links it under the extension its
//! content looks like (or, for one input in four, another one), so every format parses every
//! kind of content. Memory must stay within a few times the file.

use super::{Ctx, Target};
use crate::mutate::Rng;
use anyhow::{Context, Result};
use std::path::Path;

const EXTS: &[&str] = &["txt", "csv", "json", "jsonl", "prompts"];

/// The long-line input: one line of 100 MB.
pub const BIG_LINE: usize = 100 << 20;

fn seeds(_: &Ctx) -> Result<Vec<Vec<u8>>> {
    let mut big = vec![b'x'; BIG_LINE];
    big.push(b'\n');
    let small = [
        b"How do I bake bread?\nWhat is 2+2?\r\n\n  \nTranslate 'hello' to French.\n".to_vec(),
        b"prompt,source\n\"Say \"\"hi\"\"\",a\n\"two\nlines\",b\n,c\n".to_vec(),
        b"\"one column\"\nplain\n\"with, comma\"\n".to_vec(),
        br#"[{"instruction":"Write a poem","input":"about rust"},{"prompt":"Hi"},{"instruction":"x","input":null}]"#.to_vec(),
        b"{\"instruction\":\"a\",\"input\":\"b\"}\n\n{\"prompt\":\"c\"}\n{\"instruction\":\"\\u00e9\\ud83d\\ude42\"}\n".to_vec(),
        b"caf\xc3\xa9\nbad \xff\xfe byte\n".to_vec(),
    ];
    // The harness picks mutation bases uniformly among seeds: each small seed 32 times makes
    // the 100 MB one (copied whenever it is picked) a rare base, so that runs stay fast.
    let mut out = vec![big];
    for _ in 0..32 {
        out.extend(small.iter().cloned());
    }
    Ok(out)
}

/// FNV-1a of a prefix and the length: cheap even on the 100 MB input.
fn hash(input: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ input.len() as u64;
    for &b in input.iter().take(4096) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The extension the content looks like.
fn sniff(input: &[u8]) -> &'static str {
    let first = input.split(|&b| b == b'\n').next().unwrap_or(b"");
    match input.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "json",
        Some(b'{') => "jsonl",
        _ if first.starts_with(b"prompt") || first.contains(&b',') || first.starts_with(b"\"") => {
            "csv"
        }
        _ => "txt",
    }
}

/// CSV-, JSON- and text-aware edits: quotes, commas, braces and line breaks where a parser
/// keeps state, and long repeats of them.
fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    const PIECES: &[&[u8]] = &[
        b"\"",
        b",",
        b"\n",
        b"\r\n",
        b"\r",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b"\\",
        b"\\u",
        b"\\ud800",
        b"\xff",
        b"\xc3",
        b"\0",
        b"prompt",
        b"\"instruction\":",
        b"null",
        b"1e999",
    ];
    // The long-line input is used as it is (a mutation would copy 100 MB each time).
    if input.len() > 1 << 20 {
        return None;
    }
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let p = PIECES[rng.below(PIECES.len())];
        let times = if rng.below(8) == 0 {
            1 + rng.below(4096)
        } else {
            1
        };
        let at = rng.below(v.len() + 1);
        v.splice(at..at, p.repeat(times));
    }
    Some(v)
}

fn run(path: &Path) -> Result<()> {
    let input = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let h = hash(&input);
    let ext = if h.is_multiple_of(4) {
        EXTS[((h >> 2) % EXTS.len() as u64) as usize]
    } else {
        sniff(&input)
    };
    drop(input);
    let named = path.with_extension(format!("prompts.{ext}"));
    std::fs::hard_link(path, &named).with_context(|| format!("cannot link {}", named.display()))?;
    // --column: none for text; `prompt` for one input in two of the others.
    let column =
        (ext != "txt" && ext != "prompts" && (h >> 8).is_multiple_of(2)).then_some("prompt");
    sl_engine::text::prompts::read_prompts(&named, column).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "prompts",
        file_name: "input.prompts",
        seeds,
        mutate: Some(mutate),
        run,
        mem_base: 16 << 20,
        mem_factor: 4,
        max_len: 1 << 16,
    }
}
