//! `config.json` of every family: the fixtures' configs, with fields removed, renamed or set to
//! extreme values.

use super::{Ctx, Target};
use crate::mutate;
use anyhow::Result;
use std::path::Path;

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    super::fixture_files(ctx, "config.json")
}

fn run(path: &Path) -> Result<()> {
    sl_engine::ModelConfig::from_file(path).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "config",
        file_name: "config.json",
        seeds,
        mutate: Some(mutate::json_doc),
        run,
        mem_base: 16 << 20,
        mem_factor: 64,
        max_len: 1 << 16,
    }
}
