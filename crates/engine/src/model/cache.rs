//! The key/value cache of a forward pass, with the prompt head every row shares held once.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Key/value tensors of every layer, `[B, Hkv, S, D]`.
///
/// The first `shared` positions may be a prompt prefix common to every row, computed once and
/// held as one row (broadcast to the batch when a layer reads it); a row's left padding then sits
/// right after them instead of at position 0. With `append` false a forward pass reads the cache
/// but does not keep its own keys/values (hidden-state extraction needs no next step).
///
/// On the CPU a layer's keys and values are views of the first S positions of buffers with room
/// for more (`spare`), and a decode step writes its position into that room: re-joining the
/// whole cache every step copied ~55 MB a step at 16 rows of SmolLM2, 4.5% of a generation, and
/// grows with the square of the output's length. A clone never shares the buffers (it starts
/// its own at its first step), so no two caches write into the same memory.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    pub shared: usize,
    pub append: bool,
    spare: Vec<Option<Spare>>,
}

/// A layer's key and value buffers `[B, Hkv, capacity, D]`, of which `layers` views the first
/// positions.
#[derive(Debug)]
struct Spare {
    k: Tensor,
    v: Tensor,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.clone(),
            shared: self.shared,
            append: self.append,
            spare: vec![],
        }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            shared: 0,
            append: true,
            spare: vec![],
        }
    }

    /// A cache whose every row starts with the one-row cache `prefix` of `shared` positions,
    /// marked so padding goes after it.
    pub fn from_shared(prefix: &KvCache, shared: usize) -> KvCache {
        KvCache {
            layers: prefix.layers.clone(),
            shared,
            append: true,
            spare: vec![],
        }
    }

    /// Layer `l`'s keys and values after `new` (`[B, Hkv, T, D]` each) is appended to `past`
    /// (what `layers[l]` held), kept as the layer's cache. On the CPU the new positions are
    /// written into the layer's buffer when it has room and `past` is its view; otherwise the
    /// two are joined into a new buffer with room for more.
    pub(crate) fn append(
        &mut self,
        l: usize,
        past: (Tensor, Tensor),
        new: (Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let ((pk, pv), (k, v)) = (past, new);
        let in_place = k.device().is_cpu()
            && [&pk, &pv, &k, &v].iter().all(|t| t.dtype() == DType::F32)
            && k.is_contiguous()
            && v.is_contiguous();
        if !in_place {
            let kv = (join_positions(&pk, &k)?, join_positions(&pv, &v)?);
            self.layers[l] = Some(kv.clone());
            return Ok(kv);
        }
        if self.spare.len() != self.layers.len() {
            self.spare = (0..self.layers.len()).map(|_| None).collect();
        }
        let (len, t, rows) = (pk.dim(2)?, k.dim(2)?, k.dim(0)?);
        let fits = match &self.spare[l] {
            // `past` is this buffer's view: its rows are the buffer's capacity apart.
            Some(sp) => {
                let room = sp.k.dim(2)?;
                pk.dim(0)? == rows
                    && room >= len + t
                    && pk.stride()[1] == room * pk.dim(3)?
                    && pv.stride()[1] == room * pv.dim(3)?
            }
            None => false,
        };
        if !fits {
            // Room for a quarter more positions (at least 32): a rebuild every few steps
            // keeps appends amortised O(1) and the spare memory small.
            let cap = len + t + ((len + t) / 4).max(32);
            self.spare[l] = Some(Spare {
                k: join_positions_cap(&pk, &k, cap)?,
                v: join_positions_cap(&pv, &v, cap)?,
            });
        } else {
            let sp = self.spare[l].as_mut().expect("checked above");
            sp.k.slice_set(&k, 2, len)?;
            sp.v.slice_set(&v, 2, len)?;
        }
        let sp = self.spare[l].as_ref().expect("set above");
        let kv = (sp.k.narrow(2, 0, len + t)?, sp.v.narrow(2, 0, len + t)?);
        self.layers[l] = Some(kv.clone());
        Ok(kv)
    }

    /// Cached positions (of the first layer that holds any).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Cached positions of layer `l`.
    pub fn len_at(&self, l: usize) -> usize {
        self.layers
            .get(l)
            .and_then(|c| c.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each layer's keys and values as tensors of their own, without the room for more
    /// positions: for a cache that is kept but never appended to again (the localisation
    /// prefix), whose views would otherwise hold whole buffers.
    pub fn compact(&mut self) -> Result<()> {
        // A view of a buffer is the one layout here that is not contiguous.
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.contiguous()?;
            *v = v.contiguous()?;
        }
        self.spare.clear();
        Ok(())
    }

    /// Keeps only the rows `idx` of the batch (sequences still generating).
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let Some((k, v)) = layer else { continue };
            match self.spare.get_mut(l).and_then(|s| s.as_mut()) {
                // The buffers' rows, room included, so later steps still append in place.
                Some(sp) => {
                    sp.k = sp.k.index_select(idx, 0)?;
                    sp.v = sp.v.index_select(idx, 0)?;
                    let len = k.dim(2)?;
                    *k = sp.k.narrow(2, 0, len)?;
                    *v = sp.v.narrow(2, 0, len)?;
                }
                None => {
                    *k = k.contiguous()?.index_select(idx, 0)?;
                    *v = v.contiguous()?.index_select(idx, 0)?;
                }
            }
        }
        Ok(())
    }
}

/// `past` (`[pb, H, S, D]`, where pb = 1 is a shared prefix held once for the batch) followed by
/// `new` (`[B, H, T, D]`) along the positions: `[B, H, S + T, D]`. Contiguous f32 CPU tensors are
/// joined in one threaded pass; candle's cat (and the prefix's broadcast copy before it) ran on
/// one thread for every layer of every decode step. Anything else goes through candle.
pub(crate) fn join_positions(past: &Tensor, new: &Tensor) -> Result<Tensor> {
    join_positions_cap(past, new, past.dim(2)? + new.dim(2)?)
}

/// `join_positions` into `[B, H, cap, D]` (cap >= S + T): the positions after S + T are zeros,
/// room for later steps. `past` may be a view of a longer buffer (the layout `KvCache::append`
/// keeps), read in place; `new` and the result are contiguous f32 CPU tensors on the threaded
/// path, else candle joins and pads.
fn join_positions_cap(past: &Tensor, new: &Tensor, cap: usize) -> Result<Tensor> {
    use crate::kernels::{attention::with_heads, matmul_small::with_f32};
    let (pb, h, s, d) = past.dims4()?;
    let (b, h2, t, d2) = new.dims4()?;
    ensure!(
        (h, d) == (h2, d2) && (pb == b || pb == 1),
        "kv cache: cached {:?} cannot take new positions {:?}",
        past.dims(),
        new.dims()
    );
    ensure!(
        cap >= s + t,
        "kv cache: capacity {cap} below {} positions",
        s + t
    );
    let threaded = past.device().is_cpu() && past.dtype() == DType::F32;
    let join = || {
        with_f32(new, |nv| {
            with_heads(past, |pv, ph| {
                // Every element is written below, so the buffer is not zeroed first (the memset
                // was ~3% of a generation profile when the cache was re-joined every step).
                let n = b * h * cap * d;
                let mut out: Vec<f32> = Vec::with_capacity(n);
                out.spare_capacity_mut()[..n]
                    .par_chunks_mut(cap * d)
                    .enumerate()
                    .for_each(|(bh, row)| {
                        let from = if pb == 1 { bh % h } else { bh };
                        let (head, rest) = row.split_at_mut(s * d);
                        let (tail, room) = rest.split_at_mut(t * d);
                        write_all(head, &pv[from * ph..from * ph + s * d]);
                        write_all(tail, &nv[bh * t * d..(bh + 1) * t * d]);
                        room.fill(std::mem::MaybeUninit::new(0.0));
                    });
                // SAFETY: the chunks cover all n elements (b * h rows of cap * d), each written in
                // full above.
                unsafe { out.set_len(n) };
                Ok(out)
            })
        })
    };
    let joined = if threaded { join().transpose()? } else { None };
    if let Some(out) = joined {
        return Ok(Tensor::from_vec(out, (b, h, cap, d), past.device())?);
    }
    let past = if pb == b {
        past.clone()
    } else {
        past.broadcast_as((b, h, s, d))?.contiguous()?
    };
    let joined = Tensor::cat(&[&past, new], 2)?;
    if cap == s + t {
        return Ok(joined);
    }
    let room = Tensor::zeros((b, h, cap - s - t, d), joined.dtype(), joined.device())?;
    Ok(Tensor::cat(&[&joined, &room], 2)?)
}

/// Initialises `dst` with `src` (equal lengths): std's `write_copy_of_slice` needs Rust 1.93,
/// and the workspace supports 1.80.
fn write_all(dst: &mut [std::mem::MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "kv cache: a row's length");
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The threaded join equals candle's broadcast and cat, for a per-row past and a one-row
    /// shared prefix.
    #[test]
    fn join_equals_candles_cat() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, seed: u64| crate::kernels::pseudo(n, seed);
        let new = Tensor::from_vec(vals(3 * 2 * 2 * 4, 1), (3, 2, 2, 4), &dev)?;
        for pb in [3, 1] {
            let past = Tensor::from_vec(vals(pb * 2 * 5 * 4, 2), (pb, 2, 5, 4), &dev)?;
            let want = Tensor::cat(&[&past.broadcast_as((3, 2, 5, 4))?.contiguous()?, &new], 2)?;
            let got = join_positions(&past, &new)?;
            assert_eq!(got.dims(), &[3, 2, 7, 4]);
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(&got)?, flat(&want)?, "past rows {pb}");
        }
        let wrong = Tensor::zeros((2, 2, 5, 4), candle_core::DType::F32, &dev)?;
        assert!(join_positions(&wrong, &new).is_err());
        Ok(())
    }

    /// Appends in place (several steps, a shared one-row prefix, rows dropped in between, a
    /// clone stepping on its own) hold exactly what re-joining holds, and a clone's steps
    /// never show in the cache it came from.
    #[test]
    fn appends_in_place_equal_rejoining() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |dims: (usize, usize, usize, usize), seed: u64| {
            let n = dims.0 * dims.1 * dims.2 * dims.3;
            Tensor::from_vec(crate::kernels::pseudo(n, seed), dims, &dev)
        };
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let prefix = (vals((1, 2, 3, 4), 1)?, vals((1, 2, 3, 4), 2)?);
        let mut cache = KvCache::new(1);
        cache.layers[0] = Some(prefix.clone());
        let (mut want_k, mut want_v) = prefix;
        let mut rows = 3;
        let mut fork = None;
        // Prefill of 5 positions, then one position a step: past the first buffer's room of 32.
        for step in 0..40u64 {
            let t = if step == 0 { 5 } else { 1 };
            if step == 7 {
                let idx = Tensor::new(&[2u32, 0], &dev)?;
                cache.select_rows(&idx)?;
                want_k = want_k.index_select(&idx, 0)?;
                want_v = want_v.index_select(&idx, 0)?;
                rows = 2;
            }
            let (k, v) = (
                vals((rows, 2, t, 4), 10 + step)?,
                vals((rows, 2, t, 4), 60 + step)?,
            );
            let past = cache.layers[0].take().expect("filled");
            let (gk, gv) = cache.append(0, past, (k.clone(), v.clone()))?;
            want_k = join_positions(&want_k, &k)?;
            want_v = join_positions(&want_v, &v)?;
            assert_eq!(gk.dims(), want_k.dims(), "step {step}");
            assert_eq!(flat(&gk)?, flat(&want_k)?, "keys at step {step}");
            assert_eq!(flat(&gv)?, flat(&want_v)?, "values at step {step}");
            if step == 20 {
                let mut f = cache.clone();
                let past = f.layers[0].take().expect("cloned");
                let new = (vals((rows, 2, 1, 4), 99)?, vals((rows, 2, 1, 4), 98)?);
                let (fk, _) = f.append(0, past, new)?;
                let saved = flat(&fk)?;
                fork = Some((f, fk, saved));
            }
            if step == 30 {
                let mut kept = cache.clone();
                kept.compact()?;
                let (ck, _) = kept.layers[0].as_ref().expect("kept");
                assert!(
                    ck.is_contiguous(),
                    "a compacted view still spans its buffer"
                );
                assert_eq!(flat(ck)?, flat(&want_k)?, "compacting changed the keys");
            }
            if step == 21 {
                // The original has appended at the position the fork wrote: in its own buffer.
                let (_, fk, saved) = fork.as_ref().expect("forked at step 20");
                assert_eq!(&flat(fk)?, saved, "the fork's keys changed");
            }
        }
        Ok(())
    }
}
