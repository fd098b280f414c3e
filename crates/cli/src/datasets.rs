//! Dataset names on the command line (the catalog).

use anyhow::{bail, Result};
use sl_science::cosine_report::PromptSet;

pub fn prompt_set(spec: &str) -> Result<PromptSet> {
    bail!("prompt set `{spec}`: no such file, and dataset names are not available yet")
}
