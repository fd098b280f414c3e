//! Byte-level mutations every target shares (flips, interesting integers at aligned offsets,
//! chunk insertion, deletion and duplication, splicing two seeds). Structure-aware mutations
//! live with each target, which knows its format's fields.

pub use sl_science::rng::Rng;

/// Integers that break size and count checks: zero, one, boundaries of each width, and values
/// that overflow when multiplied by an element size.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    0x3fff_ffff_ffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// One random byte-level change of `input` (never returns more than `max_len` bytes).
pub fn bytes(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            2 if v.len() >= 8 => {
                // An interesting integer at a 4- or 8-aligned offset, little-endian as GGUF and
                // safetensors store them.
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let at = rng.below(v.len() - width + 1) & !(width - 1);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                v[at..at + width].copy_from_slice(&x.to_le_bytes()[..width]);
            }
            3 if !v.is_empty() => {
                let start = rng.below(v.len());
                let len = 1 + rng.below((v.len() - start).min(64));
                v.drain(start..start + len);
            }
            4 => {
                let at = rng.below(v.len() + 1);
                let len = 1 + rng.below(16);
                let chunk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, chunk);
            }
            5 if !v.is_empty() => {
                let start = rng.below(v.len());
                let len = 1 + rng.below((v.len() - start).min(256));
                let chunk = v[start..start + len].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            7 if !v.is_empty() => {
                v.truncate(rng.below(v.len()));
            }
            _ => {}
        }
    }
    v.truncate(max_len);
    v
}

/// A random edit of a JSON document: a value replaced by an extreme one, a key renamed or
/// removed, a container emptied or nested deeply. The result is valid JSON.
pub fn json(rng: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::{json, Value};
    let extremes = [
        json!(0),
        json!(-1),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(1e308),
        json!(-0.0),
        json!(null),
        json!(""),
        json!("x".repeat(4096)),
        json!([]),
        json!({}),
        json!(true),
    ];
    // Choose a random node as a JSON pointer, then edit it in place.
    let mut pointer = String::new();
    let mut cur = &*v;
    for _ in 0..rng.below(6) {
        let step = match cur {
            Value::Object(m) if !m.is_empty() => {
                let k = m
                    .keys()
                    .nth(rng.below(m.len()))
                    .cloned()
                    .unwrap_or_default();
                let esc = k.replace('~', "~0").replace('/', "~1");
                m.get(&k).map(|n| (n, esc))
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                a.get(i).map(|n| (n, i.to_string()))
            }
            _ => None,
        };
        match step {
            Some((n, seg)) if n.is_object() || n.is_array() || rng.below(2) == 0 => {
                pointer.push('/');
                pointer.push_str(&seg);
                cur = n;
            }
            _ => break,
        }
    }
    let Some(node) = v.pointer_mut(&pointer) else {
        return;
    };
    match (rng.below(5), &mut *node) {
        (0, Value::Object(m)) if !m.is_empty() => {
            let k = m
                .keys()
                .nth(rng.below(m.len()))
                .cloned()
                .unwrap_or_default();
            m.remove(&k);
        }
        (1, Value::Object(m)) if !m.is_empty() => {
            let k = m
                .keys()
                .nth(rng.below(m.len()))
                .cloned()
                .unwrap_or_default();
            if let Some(x) = m.remove(&k) {
                m.insert(format!("{k}_"), x);
            }
        }
        (2, _) => {
            let mut deep = json!(1);
            for _ in 0..(1 + rng.below(200)) {
                deep = json!([deep]);
            }
            *node = deep;
        }
        _ => *node = extremes[rng.below(extremes.len())].clone(),
    }
}

/// One to three `json` edits of a JSON document's bytes (None: the input is not JSON).
pub fn json_doc(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(input).ok()?;
    for _ in 0..1 + rng.below(3) {
        json(rng, &mut v);
    }
    serde_json::to_vec(&v).ok()
}
