//! `safety-layers data list|fetch|verify`.

use anyhow::{bail, Result};
use sl_catalog::datasets;

#[derive(clap::Subcommand)]
pub enum DataAction {
    /// Every dataset: name, rows, licence, origin at its pinned commit, sha256
    List {
        #[arg(long)]
        json: bool,
    },
    /// Resolve datasets (data dir, cache, else download from the origin) and verify them
    Fetch {
        /// Dataset names (all when none is given)
        names: Vec<String>,
    },
    /// Verify local copies only (no download)
    Verify { names: Vec<String> },
}

fn selected(names: &[String]) -> Result<Vec<datasets::Dataset>> {
    if names.is_empty() {
        return Ok(datasets::datasets());
    }
    names
        .iter()
        .map(|n| datasets::dataset(n).ok_or_else(|| anyhow::anyhow!("{}", datasets::unknown(n))))
        .collect()
}

pub fn run(action: &DataAction) -> Result<()> {
    match action {
        DataAction::List { json } => {
            let all = datasets::datasets();
            if *json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            for d in all {
                println!("{:<20} {:>6} rows  {}", d.name, d.rows, d.description);
                for f in &d.files {
                    println!(
                        "{:<20} {} ({}) sha256 {}",
                        "",
                        f.url("https://raw.githubusercontent.com"),
                        f.origin.licence,
                        f.sha256
                    );
                }
            }
        }
        DataAction::Fetch { names } | DataAction::Verify { names } => {
            let mut opts = crate::datasets::data_options();
            opts.allow_download = matches!(action, DataAction::Fetch { .. });
            let mut failed = 0;
            for d in selected(names)? {
                match datasets::resolve(&d, &opts) {
                    Ok(files) => {
                        for f in files {
                            println!(
                                "ok      {:<20} {} ({:?})",
                                d.name,
                                f.path.display(),
                                f.source
                            );
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        println!("FAILED  {:<20} {e:#}", d.name);
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} dataset(s) could not be resolved and verified");
            }
        }
    }
    Ok(())
}
