//! Training: the [`trainer::Trainer`] (trainable tensors as variables, frozen ones as plain
//! tensors), the frozen-linear op whose backward skips the weight gradient, and a fused AdamW.

pub mod adamw;
pub(crate) mod frozen_linear;
pub mod ops;
pub mod trainer;
