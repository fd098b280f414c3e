//! Training: the [`trainer::Trainer`] (trainable tensors as variables, frozen ones as plain
//! tensors), fused ops with backward passes (ops/) and a fused AdamW.

pub mod adamw;
pub mod forward;
pub mod ops;
pub mod param;
pub mod sink;
pub mod trainer;

pub use crate::kernels::gemm::Precision;
