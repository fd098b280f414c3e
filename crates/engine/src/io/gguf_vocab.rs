//! A `tokenizer.json` (and `tokenizer_config.json`) rebuilt from GGUF tokenizer metadata, the
//! way transformers' GGUF loader rebuilds it, so token ids equal transformers' on the same file.

use crate::io::gguf::{gguf_bool, gguf_ints, gguf_str, gguf_strings, gguf_u64};
use anyhow::{bail, Context as _, Result};
use candle_core::quantized::gguf_file::Content;
use serde_json::{json, Map, Value};

/// GPT-2's byte-to-printable-character table.
fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

// Raw strings cannot continue across lines, so the regexes are joined with `concat!`.
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The pre-tokenizer split regex llama.cpp's `tokenizer.ggml.pre` names (None: GPT-2's own).
fn split_regex(pre: Option<&str>) -> Option<&'static str> {
    match pre? {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// The tokenizer of a GGUF file alone (its metadata; no tensor is read), as the tokenizer.json
/// and tokenizer_config.json values transformers would build from it.
pub fn from_file(path: &std::path::Path) -> Result<(Value, Value)> {
    let shown = path.display().to_string();
    // Declared sizes checked against the file before candle allocates them.
    crate::io::gguf_check::check(path)?;
    let mut f =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {shown}: {e}"))?;
    let content = Content::read(&mut f)
        .map_err(|e| anyhow::anyhow!("{shown}: not a readable GGUF file ({e})"))?;
    build(&content, &shown)
}

/// The tokenizer.json and tokenizer_config.json values of a GGUF vocabulary.
pub fn build(c: &Content, shown: &str) -> Result<(Value, Value)> {
    let model = gguf_str(c, "tokenizer.ggml.model").unwrap_or("");
    let arch = gguf_str(c, "general.architecture").unwrap_or("");
    match model {
        "gpt2" => byte_level(c).with_context(|| format!("{shown}: vocabulary")),
        "llama" if arch.starts_with("gemma") => {
            sentencepiece(c, SpFlavour::Gemma).with_context(|| format!("{shown}: vocabulary"))
        }
        "llama" if arch == "phi3" => {
            sentencepiece(c, SpFlavour::Phi3).with_context(|| format!("{shown}: vocabulary"))
        }
        "llama" => {
            sentencepiece(c, SpFlavour::Llama).with_context(|| format!("{shown}: vocabulary"))
        }
        _ => bail!(
            "{shown}: GGUF tokenizer type `{model}` for architecture `{arch}` is not supported \
             (supported: gpt2 byte-level BPE, and llama SentencePiece-style vocabularies); \
             convert the model with its Hugging Face tokenizer.json instead"
        ),
    }
}

/// Special tokens of the vocabulary and the tokenizer_config value shared by both kinds.
fn config_value(c: &Content, tokens: &[String], add_bos_default: bool) -> Value {
    let token_at = |key: &str| {
        gguf_u64(c, key)
            .and_then(|i| tokens.get(i as usize))
            .cloned()
    };
    let mut tc = Map::new();
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tc.insert(
        "add_bos_token".into(),
        json!(gguf_bool(c, "tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default)),
    );
    tc.insert(
        "add_eos_token".into(),
        json!(gguf_bool(c, "tokenizer.ggml.add_eos_token").unwrap_or(false)),
    );
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = token_at(key) {
            tc.insert(name.into(), json!(t));
        }
    }
    if let Some(t) = gguf_str(c, "tokenizer.chat_template") {
        tc.insert("chat_template".into(), json!(t));
    }
    Value::Object(tc)
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// A BPE model; SentencePiece-style vocabularies fall back to bytes and fuse unknowns.
fn bpe(vocab: Map<String, Value>, merges: impl serde::Serialize, sentencepiece: bool) -> Value {
    json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
           "end_of_word_suffix": null, "fuse_unk": sentencepiece, "byte_fallback": sentencepiece,
           "ignore_merges": false, "vocab": vocab, "merges": merges})
}

fn tokenizer_value(
    added: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: Value,
) -> Value {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
           "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
           "decoder": decoder, "model": model})
}

/// `TemplateProcessing` adding the BOS token when `add_bos` says so.
fn post_processor(c: &Content, tokens: &[String], add_bos: bool) -> Value {
    let bos_id = gguf_u64(c, "tokenizer.ggml.bos_token_id");
    match bos_id
        .and_then(|i| tokens.get(i as usize))
        .filter(|_| add_bos)
    {
        Some(b) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [bos_id], "tokens": [b]}}}),
        None => json!({"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}),
    }
}

/// BPE merges implied by a vocabulary and its scores, as transformers' `generate_merges`
/// derives them: every split of a token into two vocabulary pieces, best score first (ties:
/// longer left piece, then longer right piece; equal keys keep vocabulary order).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let vocab: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // dict(zip(tokens, scores)): a repeated token keeps its first position and its last score.
    let mut order: Vec<usize> = Vec::new();
    let mut score_of: std::collections::HashMap<&str, f32> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        if score_of
            .insert(t.as_str(), scores.get(i).copied().unwrap_or(0.0))
            .is_none()
        {
            order.push(i);
        }
    }
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for &i in &order {
        let t = tokens[i].as_str();
        let score = score_of[t];
        let bounds: Vec<usize> = t.char_indices().map(|(b, _)| b).skip(1).collect();
        let mut local: Vec<(&str, &str)> = bounds
            .iter()
            .map(|&b| (&t[..b], &t[b..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (vocab[l], vocab[r]));
        merges.extend(
            local
                .into_iter()
                .map(|(l, r)| (l.to_string(), r.to_string(), score)),
        );
    }
    let key = |m: &(String, String, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// How transformers rebuilds a SentencePiece-style (`llama`) GGUF vocabulary, by architecture
/// (transformers' `GGUF_SENTENCEPIECE_BUILDERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpFlavour {
    /// `LlamaTokenizer`: Metaspace pre-tokenizer, merges from the scores.
    Llama,
    /// `GemmaTokenizer`: spaces replaced by a normalizer and split after, whitespace-run tokens
    /// respelled with `▁`, merges ordered by vocabulary position (the file's scores do not follow
    /// Gemma's merge order), `<unk>` as the model's unknown token, no decoder strip.
    Gemma,
    /// `LlamaTokenizer` with the prefix space from a normalizer (`Prepend ▁`, then spaces to `▁`)
    /// and no pre-tokenizer, as Phi-3's own tokenizer.json has it.
    Phi3,
}

/// Python's `str.isspace` for one character: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F, which Python counts and Rust does not.
fn python_isspace(ch: char) -> bool {
    ch.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&ch)
}

/// llama.cpp's `llama` vocabulary (SentencePiece pieces with scores and byte tokens), rebuilt as
/// transformers does for the architecture: byte-fallback BPE, merges implied by the vocabulary,
/// control tokens as special added tokens, user-defined ones as plain added tokens, BOS added
/// unless the file says otherwise.
fn sentencepiece(c: &Content, flavour: SpFlavour) -> Result<(Value, Value)> {
    let tokens = gguf_strings(c, "tokenizer.ggml.tokens")?;
    let types = gguf_ints(c, "tokenizer.ggml.token_type")?;
    // Gemma stores a token of two or more spaces as real spaces, where its tokenizer looks up
    // `▁▁`: respelled first, so the vocabulary and the merges built from it match.
    let spelled: Vec<String> = match flavour {
        SpFlavour::Gemma => tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.chars().all(python_isspace) {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect(),
        _ => tokens.clone(),
    };
    let scores: Vec<f32> = match flavour {
        // Position in the file, best first (transformers' `vocab_scores={token: -index}`).
        SpFlavour::Gemma => (0..spelled.len()).map(|i| -(i as f32)).collect(),
        _ => match c.metadata.get("tokenizer.ggml.scores") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|x| {
                    x.to_f32()
                        .map_err(|e| anyhow::anyhow!("metadata `tokenizer.ggml.scores`: {e}"))
                })
                .collect::<Result<_>>()?,
            None => vec![0.0; tokens.len()],
        },
    };
    let vocab: Map<String, Value> = spelled
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = merges_from_scores(&spelled, &scores)
        .into_iter()
        .map(|(l, r)| json!([l, r]))
        .collect();
    let special_ids: Vec<u64> = [
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ]
    .iter()
    .filter_map(|k| gguf_u64(c, k))
    .collect();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        let special = ty == 3 || special_ids.contains(&(i as u64));
        // A user-defined token is added only under a spelling the vocabulary has (transformers
        // looks up the file's spelling, so Gemma's respelled space runs are not added).
        if special || (ty == 4 && vocab.contains_key(t)) {
            added.push(added_token(i, t, special));
        }
    }
    let add_bos = gguf_bool(c, "tokenizer.ggml.add_bos_token").unwrap_or(true);
    let replace_back =
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "});
    let to_meta = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let strip = json!({"type": "Strip", "content": " ", "start": 1, "stop": 0});
    let byte_fallback = json!({"type": "ByteFallback"});
    let fuse = json!({"type": "Fuse"});
    let (normalizer, pre_tokenizer, decoders) = match flavour {
        SpFlavour::Llama => (
            Value::Null,
            json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first",
                   "split": false}),
            vec![replace_back, byte_fallback, fuse, strip],
        ),
        SpFlavour::Gemma => (
            to_meta,
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                   "invert": false}),
            vec![replace_back, byte_fallback, fuse],
        ),
        SpFlavour::Phi3 => (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, to_meta]}),
            Value::Null,
            vec![replace_back, byte_fallback, fuse, strip],
        ),
    };
    let mut model = bpe(vocab, merges, true);
    if flavour == SpFlavour::Gemma {
        model["unk_token"] = json!("<unk>");
    }
    let tokenizer = tokenizer_value(
        added,
        normalizer,
        pre_tokenizer,
        post_processor(c, &tokens, add_bos),
        json!({"type": "Sequence", "decoders": decoders}),
        model,
    );
    Ok((tokenizer, config_value(c, &tokens, true)))
}

fn byte_level(c: &Content) -> Result<(Value, Value)> {
    let tokens = gguf_strings(c, "tokenizer.ggml.tokens")?;
    let types = gguf_ints(c, "tokenizer.ggml.token_type")?;
    let merges = gguf_strings(c, "tokenizer.ggml.merges")?;
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|ch| alphabet.contains(&ch));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(t) {
            t.clone()
        } else {
            t.bytes().map(|b| table[b as usize]).collect()
        };
        vocab.insert(spelled, json!(i));
    }
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .enumerate()
    {
        // 3 = control (special), 4 = user-defined (added, not special). A control token outside
        // the byte alphabet is a llama.cpp mislabel that transformers skips too.
        let special = match ty {
            3 if in_alphabet(t) => true,
            4 => false,
            _ => continue,
        };
        added.push(added_token(i, t, special));
    }
    let pre = gguf_str(c, "tokenizer.ggml.pre");
    let pre_tokenizer = match split_regex(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}
        ]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                   "use_regex": true})
        }
    };
    let add_bos = gguf_bool(c, "tokenizer.ggml.add_bos_token").unwrap_or(false);
    let post = post_processor(c, &tokens, add_bos);
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                         "use_regex": true});
    let tokenizer = tokenizer_value(
        added,
        Value::Null,
        pre_tokenizer,
        post,
        decoder,
        bpe(vocab, merges, false),
    );
    Ok((tokenizer, config_value(c, &tokens, false)))
}
