//! The key/value cache of a forward pass, with the prompt head every row shares held once.

use anyhow::{ensure, Result};
use candle_core::Tensor;
use rayon::prelude::*;

/// Key/value tensors of every layer, `[B, Hkv, S, D]`.
///
/// The first `shared` positions may be a prompt prefix common to every row, computed once and
/// held as one row (broadcast to the batch when a layer reads it); a row's left padding then sits
/// right after them instead of at position 0. With `append` false a forward pass reads the cache
/// but does not keep its own keys/values (hidden-state extraction needs no next step).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    pub shared: usize,
    pub append: bool,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            shared: 0,
            append: true,
        }
    }

    /// A cache whose every row starts with the one-row cache `prefix` of `shared` positions,
    /// marked so padding goes after it.
    pub fn from_shared(prefix: &KvCache, shared: usize) -> KvCache {
        KvCache {
            layers: prefix.layers.clone(),
            shared,
            append: true,
        }
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

    /// Keeps only the rows `idx` of the batch (sequences still generating).
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(idx, 0)?;
            *v = v.index_select(idx, 0)?;
        }
        Ok(())
    }
}

/// `past` (`[pb, H, S, D]`, where pb = 1 is a shared prefix held once for the batch) followed by
/// `new` (`[B, H, T, D]`) along the positions: `[B, H, S + T, D]`. Contiguous f32 CPU tensors are
/// joined in one threaded pass; candle's cat (and the prefix's broadcast copy before it) ran on
/// one thread for every layer of every decode step. Anything else goes through candle.
pub(crate) fn join_positions(past: &Tensor, new: &Tensor) -> Result<Tensor> {
    use crate::kernels::matmul_small::with_f32;
    let (pb, h, s, d) = past.dims4()?;
    let (b, h2, t, d2) = new.dims4()?;
    ensure!(
        (h, d) == (h2, d2) && (pb == b || pb == 1),
        "kv cache: cached {:?} cannot take new positions {:?}",
        past.dims(),
        new.dims()
    );
    let joined = with_f32(past, |pv| {
        with_f32(new, |nv| {
            // Every element is written below, so the buffer is not zeroed first: at each
            // decode step the whole cache is joined anew, and zeroing it doubled the writes
            // (the memset was ~3% of a generation profile).
            let n = b * h * (s + t) * d;
            let mut out: Vec<f32> = Vec::with_capacity(n);
            out.spare_capacity_mut()[..n]
                .par_chunks_mut((s + t) * d)
                .enumerate()
                .for_each(|(bh, row)| {
                    let from = if pb == 1 { bh % h } else { bh };
                    let (head, tail) = row.split_at_mut(s * d);
                    write_all(head, &pv[from * s * d..(from + 1) * s * d]);
                    write_all(tail, &nv[bh * t * d..(bh + 1) * t * d]);
                });
            // SAFETY: the chunks cover all n elements (b * h rows of (s + t) * d), each written
            // in full by `write_all`.
            unsafe { out.set_len(n) };
            out
        })
    })
    .flatten();
    if let (Some(out), true) = (joined, past.device().is_cpu()) {
        return Ok(Tensor::from_vec(out, (b, h, s + t, d), past.device())?);
    }
    let past = if pb == b {
        past.clone()
    } else {
        past.broadcast_as((b, h, s, d))?.contiguous()?
    };
    Ok(Tensor::cat(&[&past, new], 2)?)
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
}
