//! locate.json as `finetune --freeze-from` reads it: the schema, then the chosen range against
//! the model's layers. A range outside the model is an error naming the file and the field.

use super::{read_seed, Ctx, Target};
use crate::mutate;
use anyhow::Result;
use sl_science::locate::file::LocateFile;
use std::path::Path;

/// Layers of the model the range is checked against (a mid-sized model; the fixture fits).
const LAYERS: usize = 32;

fn seeds(ctx: &Ctx) -> Result<Vec<Vec<u8>>> {
    Ok(vec![read_seed(
        &ctx.root.join("tests/fixtures/locate/locate.json"),
    )?])
}

fn run(path: &Path) -> Result<()> {
    LocateFile::read_range(path, LAYERS).map(|_| ())
}

pub fn target() -> Target {
    Target {
        name: "locate-json",
        file_name: "locate.json",
        seeds,
        mutate: Some(mutate::json_doc),
        run,
        mem_base: 16 << 20,
        mem_factor: 64,
        max_len: 1 << 16,
    }
}
