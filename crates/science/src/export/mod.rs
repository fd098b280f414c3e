//! The SPPFT freeze plan for other trainers: which Hugging Face parameter names a layer range
//! freezes (`plan`), written as axolotl, PEFT and Hugging Face Trainer files (`formats`).

pub mod formats;
pub mod plan;
