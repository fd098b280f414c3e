//! A GGUF header checked against the file before candle reads it.
//!
//! candle's reader believes what a header declares in places (an alignment of 0 divides by zero,
//! tensor dims whose product overflows wrap, a tensor's size is computed without overflow checks),
//! and a model file comes from the internet. This pass walks the header once, streaming, without
//! keeping any value: every declared string or array length and every count must fit in the bytes
//! left, nesting is bounded, tensor dims multiply without overflow, and every tensor's bytes lie
//! inside the file. Errors name the file and the field.

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// ggml allows at most four dimensions per tensor.
const MAX_DIMS: u64 = 4;
/// Arrays of arrays are legal GGUF; real files nest at most once.
const MAX_DEPTH: usize = 8;
/// Keys and tensor names are short identifiers; the GGUF spec caps keys at 65535 bytes.
const MAX_NAME: u64 = 1 << 16;

/// The ggml storage types candle reads, by their GGUF type id.
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    use GgmlDType as G;
    Some(match id {
        0 => G::F32,
        1 => G::F16,
        2 => G::Q4_0,
        3 => G::Q4_1,
        6 => G::Q5_0,
        7 => G::Q5_1,
        8 => G::Q8_0,
        9 => G::Q8_1,
        10 => G::Q2K,
        11 => G::Q3K,
        12 => G::Q4K,
        13 => G::Q5K,
        14 => G::Q6K,
        15 => G::Q8K,
        30 => G::BF16,
        _ => return None,
    })
}

/// A reader that knows its position and how many bytes the file has left.
struct Cursor<R> {
    r: BufReader<R>,
    pos: u64,
    len: u64,
    shown: String,
}

impl<R: Read + Seek> Cursor<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        if self.left() < N as u64 {
            bail!(
                "{}: {}: the file ends at byte {}",
                self.shown,
                what(),
                self.len
            );
        }
        self.r
            .read_exact(&mut b)
            .with_context(|| format!("{}: {}: cannot read", self.shown, what()))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// A length or count: u32 in GGUF v1, u64 later.
    fn len_field(&mut self, v1: bool, what: &dyn Fn() -> String) -> Result<u64> {
        if v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.left() {
            bail!(
                "{}: {}: {n} bytes declared, only {} left in the file",
                self.shown,
                what(),
                self.left()
            );
        }
        // Within the buffer when the string is short: a plain seek would drop the buffer.
        self.r
            .seek_relative(n as i64)
            .with_context(|| format!("{}: {}: cannot seek", self.shown, what()))?;
        self.pos += n;
        Ok(())
    }

    /// A string's bytes, at most `cap` of them (a key or a tensor name).
    fn string(&mut self, v1: bool, cap: u64, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.len_field(v1, what)?;
        if n > cap || n > self.left() {
            bail!(
                "{}: {}: string of {n} bytes declared, {} left in the file (limit {cap})",
                self.shown,
                what(),
                self.left()
            );
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .with_context(|| format!("{}: {}: cannot read", self.shown, what()))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
}

/// The least number of bytes a value of GGUF type `ty` takes on disk (None: no such type).
fn min_size(ty: u32, v1: bool) -> Option<u64> {
    let prefix = if v1 { 4 } else { 8 };
    Some(match ty {
        0 | 1 | 7 => 1,  // u8, i8, bool
        2 | 3 => 2,      // u16, i16
        4..=6 => 4,      // u32, i32, f32
        10..=12 => 8,    // u64, i64, f64
        8 => prefix,     // string
        9 => 4 + prefix, // array: element type + length
        _ => return None,
    })
}

/// Skips one value of type `ty`, checking every declared length against the bytes left.
/// Returns the value when it is a small unsigned integer (for `general.alignment`).
fn value<R: Read + Seek>(
    c: &mut Cursor<R>,
    ty: u32,
    v1: bool,
    depth: usize,
    what: &dyn Fn() -> String,
) -> Result<Option<i64>> {
    let Some(size) = min_size(ty, v1) else {
        bail!("{}: {}: unknown value type {ty}", c.shown, what());
    };
    match ty {
        0 => Ok(Some(c.bytes::<1>(what)?[0] as i64)),
        1 => Ok(Some(c.bytes::<1>(what)?[0] as i8 as i64)),
        2 => Ok(Some(u16::from_le_bytes(c.bytes::<2>(what)?) as i64)),
        3 => Ok(Some(i16::from_le_bytes(c.bytes::<2>(what)?) as i64)),
        4 => Ok(Some(c.u32(what)? as i64)),
        5 => Ok(Some(c.u32(what)? as i32 as i64)),
        7 => match c.bytes::<1>(what)?[0] {
            0 | 1 => Ok(None),
            b => bail!("{}: {}: bool byte {b} is neither 0 nor 1", c.shown, what()),
        },
        8 => {
            let n = c.len_field(v1, what)?;
            c.skip(n, what)?;
            Ok(None)
        }
        9 => {
            if depth >= MAX_DEPTH {
                bail!(
                    "{}: {}: arrays nested deeper than {MAX_DEPTH}",
                    c.shown,
                    what()
                );
            }
            let elem = c.u32(what)?;
            let Some(elem_size) = min_size(elem, v1) else {
                bail!("{}: {}: unknown array element type {elem}", c.shown, what());
            };
            let n = c.len_field(v1, what)?;
            let need = n.saturating_mul(elem_size);
            if need > c.left() {
                bail!(
                    "{}: {}: array of {n} elements needs at least {need} bytes, only {} left in \
                     the file",
                    c.shown,
                    what(),
                    c.left()
                );
            }
            if elem == 8 || elem == 9 {
                for _ in 0..n {
                    value(c, elem, v1, depth + 1, what)?;
                }
            } else {
                c.skip(need, what)?;
            }
            Ok(None)
        }
        _ => {
            c.skip(size, what)?;
            Ok(None)
        }
    }
}

/// Checks the header of the GGUF file at `path` against its length: magic, version, counts,
/// metadata entries, tensor infos, and that every tensor's bytes lie inside the file.
pub fn check(path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let len = f
        .metadata()
        .with_context(|| format!("cannot stat {shown}"))?
        .len();
    let mut c = Cursor {
        r: BufReader::with_capacity(1 << 16, f),
        pos: 0,
        len,
        shown: shown.clone(),
    };
    let magic = c.u32(&|| "magic".into())?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        bail!("{shown}: not a GGUF file (magic 0x{magic:08x}, expected `GGUF`)");
    }
    let version = c.u32(&|| "version".into())?;
    if !(1..=3).contains(&version) {
        bail!("{shown}: GGUF version {version} is not supported (1, 2 or 3)");
    }
    let v1 = version == 1;
    let n_tensors = c.len_field(v1, &|| "tensor count".into())?;
    let n_kv = c.len_field(v1, &|| "metadata count".into())?;
    let prefix = if v1 { 4 } else { 8 };
    // The least bytes each entry takes: a key and a value type and one byte; a tensor name,
    // n_dims, a type and an offset.
    let need = n_kv
        .saturating_mul(prefix + 5)
        .saturating_add(n_tensors.saturating_mul(prefix + 16));
    if need > c.left() {
        bail!(
            "{shown}: header declares {n_tensors} tensors and {n_kv} metadata entries, which \
             need at least {need} bytes; the file has {} left",
            c.left()
        );
    }
    let mut alignment = 32u64;
    for i in 0..n_kv {
        let key = c.string(v1, MAX_NAME, &|| format!("metadata entry {i}: key"))?;
        let what = || format!("metadata entry {i} (`{key}`)");
        let ty = c.u32(&what)?;
        let v = value(&mut c, ty, v1, 0, &what)?;
        if key == "general.alignment" {
            // candle reads the unsigned and non-negative signed integer types up to 32 bits.
            if let (Some(a), 0..=5) = (v, ty) {
                if a >= 0 {
                    if a == 0 || !(a as u64).is_power_of_two() {
                        bail!("{shown}: {}: alignment {a} is not a power of two", what());
                    }
                    alignment = a as u64;
                }
            }
        }
    }
    let mut tensors = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(v1, MAX_NAME, &|| format!("tensor info {i}: name"))?;
        let what = || format!("tensor info {i} ({name})");
        let n_dims = c.u32(&what)? as u64;
        if n_dims > MAX_DIMS {
            bail!(
                "{shown}: {}: {n_dims} dimensions (ggml allows at most {MAX_DIMS})",
                what()
            );
        }
        let mut elems = 1u64;
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = c.len_field(v1, &what)?;
            dims.push(d);
            elems = elems.checked_mul(d).with_context(|| {
                format!(
                    "{shown}: {}: dims {dims:?} overflow when multiplied",
                    what()
                )
            })?;
        }
        let ty = c.u32(&what)?;
        let Some(dtype) = ggml_dtype(ty) else {
            bail!("{shown}: {}: unknown ggml type {ty}", what());
        };
        let block = dtype.block_size() as u64;
        if !elems.is_multiple_of(block) {
            bail!(
                "{shown}: {}: {elems} elements (dims {dims:?}) are not a whole number of \
                 {dtype:?} blocks of {block}",
                what()
            );
        }
        let bytes = (elems / block).checked_mul(dtype.type_size() as u64);
        let Some(bytes) = bytes.filter(|b| usize::try_from(*b).is_ok()) else {
            bail!(
                "{shown}: {}: dims {dims:?} of {dtype:?} overflow in bytes",
                what()
            );
        };
        let offset = c.u64(&what)?;
        tensors.push((i, name, offset, bytes));
    }
    let data_start = c.pos.div_ceil(alignment).saturating_mul(alignment);
    for (i, name, offset, bytes) in tensors {
        let end = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|e| e > len) {
            bail!(
                "{shown}: tensor info {i} ({name}): offset {offset} + {bytes} bytes (data from \
                 byte {data_start}) is past the end of the file ({len} bytes)"
            );
        }
    }
    Ok(())
}
