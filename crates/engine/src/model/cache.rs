//! The key/value cache of a forward pass, with the prompt head every row shares held once.

use anyhow::Result;
use candle_core::Tensor;

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
