//! GGUF files: header, metadata and tensor infos, through `GgufModel::load` and `read_config`.
//!
//! Seeds: the committed tiny llama.cpp-style fixture (loads completely: dequantisation and the
//! vocabulary run) and the head of the real SmolLM2 GGUF (its real header, metadata and
//! vocabulary, cut inside the tensor data: a file the loader must refuse cleanly). The mutation
//! walks the header and sets one field (a count, a length, a type, a dim, an offset) to an
//! extreme value.

use super::{read_seed, Ctx, Target};
use crate::mutate::{Rng, INTERESTING};
use anyhow::Result;
use std::path::Path;

/// Bytes of the real GGUF kept as a seed: its header (about 1.5 MB of metadata, mostly the
/// vocabulary, and the tensor infos) and the first tensors.
const REAL_HEAD: usize = 2 << 20;

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let mut out = vec![read_seed(
        &ctx.root.join("tests/fixtures/gguf/tiny_llama_sp.gguf"),
    )?];
    let real = ctx.shared.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if real.is_file() {
        use std::io::Read;
        let mut head = Vec::with_capacity(REAL_HEAD);
        std::fs::File::open(&real)?
            .take(REAL_HEAD as u64)
            .read_to_end(&mut head)?;
        out.push(head);
    }
    Ok(out)
}

/// What a header field holds, so a mutation can pick a kind first (the vocabulary's thousands
/// of string lengths would otherwise crowd out the few counts and offsets).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Count,
    KeyLen,
    ValueType,
    StrLen,
    ArrayType,
    ArrayLen,
    NameLen,
    NDims,
    Dim,
    TensorType,
    Offset,
}

const KINDS: [Kind; 11] = [
    Kind::Count,
    Kind::KeyLen,
    Kind::ValueType,
    Kind::StrLen,
    Kind::ArrayType,
    Kind::ArrayLen,
    Kind::NameLen,
    Kind::NDims,
    Kind::Dim,
    Kind::TensorType,
    Kind::Offset,
];

struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

/// Walks a GGUF header as far as it is well formed, recording where each field lies.
struct Walk<'a> {
    b: &'a [u8],
    pos: usize,
    v1: bool,
    fields: Vec<Field>,
}

impl Walk<'_> {
    fn int(&mut self, width: usize, kind: Kind) -> Option<u64> {
        let s = self.b.get(self.pos..self.pos + width)?;
        let mut x = [0u8; 8];
        x[..width].copy_from_slice(s);
        self.fields.push(Field {
            at: self.pos,
            width,
            kind,
        });
        self.pos += width;
        Some(u64::from_le_bytes(x))
    }

    fn len(&mut self, kind: Kind) -> Option<u64> {
        self.int(if self.v1 { 4 } else { 8 }, kind)
    }

    fn string(&mut self, kind: Kind) -> Option<()> {
        let n = self.len(kind)? as usize;
        self.pos = self.pos.checked_add(n).filter(|&e| e <= self.b.len())?;
        Some(())
    }

    fn value(&mut self, ty: u64, depth: usize) -> Option<()> {
        match ty {
            0 | 1 | 7 => self.pos += 1,
            2 | 3 => self.pos += 2,
            4..=6 => self.pos += 4,
            10..=12 => self.pos += 8,
            8 => self.string(Kind::StrLen)?,
            9 if depth < 4 => {
                let elem = self.int(4, Kind::ArrayType)?;
                let n = self.len(Kind::ArrayLen)?;
                let fixed = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    _ => 0,
                };
                if fixed > 0 {
                    let bytes = (n as usize).checked_mul(fixed)?;
                    self.pos = self.pos.checked_add(bytes)?;
                } else {
                    for _ in 0..n.min(1 << 20) {
                        self.value(elem, depth + 1)?;
                    }
                }
            }
            _ => return None,
        }
        (self.pos <= self.b.len()).then_some(())
    }

    fn header(&mut self) -> Option<()> {
        self.pos = 4;
        let version = self.int(4, Kind::Count)?;
        self.v1 = version == 1;
        let n_tensors = self.len(Kind::Count)?;
        let n_kv = self.len(Kind::Count)?;
        for _ in 0..n_kv.min(1 << 20) {
            self.string(Kind::KeyLen)?;
            let ty = self.int(4, Kind::ValueType)?;
            self.value(ty, 0)?;
        }
        for _ in 0..n_tensors.min(1 << 20) {
            self.string(Kind::NameLen)?;
            let n_dims = self.int(4, Kind::NDims)?;
            for _ in 0..n_dims.min(8) {
                self.len(Kind::Dim)?;
            }
            self.int(4, Kind::TensorType)?;
            self.int(8, Kind::Offset)?;
        }
        Some(())
    }
}

/// Sets one header field, of a randomly chosen kind, to an extreme or nearby value.
fn mutate(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut w = Walk {
        b: input,
        pos: 0,
        v1: false,
        fields: vec![],
    };
    w.header();
    let kind = KINDS[rng.below(KINDS.len())];
    let of_kind: Vec<&Field> = w.fields.iter().filter(|f| f.kind == kind).collect();
    let pool = if of_kind.is_empty() {
        w.fields.iter().collect()
    } else {
        of_kind
    };
    if pool.is_empty() {
        return None;
    }
    let f = pool[rng.below(pool.len())];
    let mut old = [0u8; 8];
    old[..f.width].copy_from_slice(&input[f.at..f.at + f.width]);
    let old = u64::from_le_bytes(old);
    let new = match rng.below(4) {
        0 | 1 => INTERESTING[rng.below(INTERESTING.len())],
        2 => old.wrapping_add(rng.below(9) as u64).wrapping_sub(4),
        // Types are small ids: every id near the known ones.
        _ => rng.below(40) as u64,
    };
    let mut v = input.to_vec();
    v[f.at..f.at + f.width].copy_from_slice(&new.to_le_bytes()[..f.width]);
    Some(v)
}

fn run(path: &Path) -> Result<()> {
    let config = sl_engine::io::gguf::read_config(path);
    let model =
        sl_engine::io::gguf::GgufModel::load(path, sl_engine::io::loader::WeightDType::Native);
    config?;
    model.map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "gguf",
        file_name: "model.gguf",
        seeds,
        mutate: Some(mutate),
        run,
        // Dequantised tensors take up to 12.2 times their Q2_K bytes as f32, next to the raw
        // copy of the tensor being read; candle's metadata values take 32 bytes each, which a
        // 1-byte array element on disk becomes (64 with the vector's growth).
        mem_base: 32 << 20,
        mem_factor: 64,
        max_len: REAL_HEAD + (1 << 16),
    }
}
