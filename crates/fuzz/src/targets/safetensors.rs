//! A model directory with one `model.safetensors`, through `safetensors_files` and
//! `load_safetensors` (memory-mapped: a header that declares bytes past the end must be refused
//! before any tensor is touched). Seeds: the fixtures' `model.safetensors`.

use super::{read_seed, Ctx, Target};
use crate::mutate::{self, Rng, INTERESTING};
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut fams: Vec<_> = std::fs::read_dir(ctx.root.join("tests/fixtures"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("model.safetensors"))
        .filter(|p| p.is_file())
        .collect();
    fams.sort();
    for p in fams {
        out.push(read_seed(&p)?);
    }
    Ok(out)
}

/// The header length, the JSON header and the data of a safetensors file (None: too short or
/// a length past the end).
fn split(input: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let n = u64::from_le_bytes(input.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    Some((n, input.get(8..end)?, input.get(end..)?))
}

fn extreme(rng: &mut Rng) -> Value {
    json!(INTERESTING[rng.below(INTERESTING.len())])
}

/// A field-aware change of a safetensors file: its header length, one tensor's dtype, shape or
/// data offsets, the JSON anywhere, or the length of the data.
pub(super) fn mutate_file(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let (n, header, data) = split(input)?;
    let mut h: Value = serde_json::from_slice(header).ok()?;
    let mut data = data.to_vec();
    match rng.below(6) {
        0 => {
            let mut v = input.to_vec();
            let x = match rng.below(2) {
                0 => INTERESTING[rng.below(INTERESTING.len())],
                _ => n.wrapping_add(rng.below(17) as u64).wrapping_sub(8),
            };
            v[..8].copy_from_slice(&x.to_le_bytes());
            return Some(v);
        }
        1..=3 => {
            let obj = h.as_object_mut()?;
            let names: Vec<String> = obj
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            if names.is_empty() {
                return None;
            }
            let t = obj.get_mut(&names[rng.below(names.len())])?;
            match rng.below(3) {
                0 => {
                    let dtypes = [
                        "F32", "BF16", "F16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "I64", "Q4", "",
                    ];
                    t["dtype"] = json!(dtypes[rng.below(dtypes.len())]);
                }
                1 => {
                    let shape = t.get_mut("shape")?.as_array_mut()?;
                    match rng.below(3) {
                        0 if !shape.is_empty() => {
                            let i = rng.below(shape.len());
                            shape[i] = extreme(rng);
                        }
                        1 => shape.push(extreme(rng)),
                        _ => {
                            shape.pop();
                        }
                    }
                }
                _ => {
                    let offs = t.get_mut("data_offsets")?.as_array_mut()?;
                    if offs.is_empty() {
                        return None;
                    }
                    let i = rng.below(offs.len());
                    offs[i] = match rng.below(2) {
                        0 => extreme(rng),
                        _ => json!(offs[i]
                            .as_u64()?
                            .wrapping_add(rng.below(9) as u64)
                            .wrapping_sub(4)),
                    };
                }
            }
        }
        4 => mutate::json(rng, &mut h),
        _ => {
            // The data shorter or longer than the header says.
            if rng.below(2) == 0 && !data.is_empty() {
                data.truncate(rng.below(data.len()));
            } else {
                data.extend(std::iter::repeat_n(0u8, 1 + rng.below(64)));
            }
        }
    }
    let h = serde_json::to_vec(&h).ok()?;
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(&h);
    v.extend_from_slice(&data);
    Some(v)
}

fn run(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .expect("the worker's file lies in a directory");
    let files = sl_engine::io::weights::safetensors_files(dir)?;
    sl_engine::io::weights::load_safetensors(&files, &dir.display().to_string(), None).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "safetensors",
        file_name: "model.safetensors",
        seeds,
        mutate: Some(mutate_file),
        run,
        // The mapped file is not counted; its tensors as f32 take at most twice the bytes of
        // 16-bit data, and the parsed JSON header a few times its text (a shape dim of "1," is
        // an 8-byte integer in a growing vector).
        mem_base: 16 << 20,
        mem_factor: 16,
        max_len: 1 << 21,
    }
}
