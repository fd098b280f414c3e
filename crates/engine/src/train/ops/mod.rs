//! Fused training operations: candle custom ops whose backward passes write each gradient in
//! one pass on rayon threads, in place of chains of small candle ops (each of which allocates its
//! result and, in backward, a zeroed gradient it then adds into).

pub mod act;
pub mod attention;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod rope;
mod rows;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The contiguous f32 values of a custom op's input.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("training op: input is not contiguous"),
        _ => candle_core::bail!("training op: expected f32 values, got {:?}", s.dtype()),
    }
}

/// As [`f32_slice`], for a tensor's storage (in a backward pass).
pub(crate) fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l),
        _ => candle_core::bail!("training op: tensor is not on the CPU"),
    }
}

/// A tensor on `like`'s device holding `v` (moved, not copied).
pub(crate) fn tensor_from<S: Into<candle_core::Shape>>(
    v: Vec<f32>,
    shape: S,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())
}
