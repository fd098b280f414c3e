//! Models and datasets named on the command line: a path that exists, or a catalog name.

use anyhow::{bail, Context, Result};
use sl_catalog::datasets;
use sl_engine::text::prompts::read_prompts;
use sl_engine::{Model, PromptRecord};
use sl_science::cosine::report::PromptSet;
use std::path::{Path, PathBuf};

/// A model path, or a catalog name resolved to one (fetched and verified if needed).
pub fn model_path(spec: &Path) -> Result<PathBuf> {
    let s = spec.to_string_lossy();
    let (p, _) =
        sl_catalog::models::resolve_model(&s, &sl_catalog::models::ModelOptions::from_env())?;
    Ok(p)
}

pub fn load_model(spec: &Path) -> Result<Model> {
    let p = model_path(spec)?;
    Model::load(&p).with_context(|| format!("cannot load model {}", spec.display()))
}

/// A prompt set from a file (with an optional column) or a dataset name.
pub fn prompt_set_with(spec: &str, column: Option<&str>) -> Result<PromptSet> {
    let path = Path::new(spec);
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {spec}"))?;
        return Ok(PromptSet {
            name: spec.to_string(),
            records: read_prompts(path, column)?,
            sha256: sl_science::sha256_hex(&bytes),
        });
    }
    let Some(ds) = datasets::dataset(spec) else {
        bail!(
            "prompts `{spec}`: no such file, and not a dataset name (datasets: {})",
            datasets::names().join(", ")
        );
    };
    if column.is_some() {
        bail!("--column applies to prompt files, not to the dataset `{spec}`");
    }
    let files = datasets::resolve(&ds, &datasets::DataOptions::from_env())?;
    let records = datasets::read_prompts(&ds, &files)?
        .into_iter()
        .map(|(instruction, input)| PromptRecord { instruction, input })
        .collect::<Vec<_>>();
    if records.is_empty() {
        bail!("dataset `{spec}` holds no prompts");
    }
    let sha = files
        .iter()
        .map(|f| f.sha256.as_str())
        .collect::<Vec<_>>()
        .join("+");
    Ok(PromptSet {
        name: spec.to_string(),
        records,
        sha256: sha,
    })
}

/// The file of a single-file dataset, resolved and verified: `(path, sha256)`; None when `spec`
/// is not a dataset name.
pub fn dataset_file(spec: &str) -> Result<Option<(PathBuf, String)>> {
    let Some(ds) = datasets::dataset(spec) else {
        return Ok(None);
    };
    let files = datasets::resolve(&ds, &datasets::DataOptions::from_env())?;
    let [file] = files.as_slice() else {
        bail!("dataset `{spec}` is not a single training file")
    };
    Ok(Some((file.path.clone(), file.sha256.clone())))
}

pub fn prompt_set(spec: &str) -> Result<PromptSet> {
    prompt_set_with(spec, None)
}
