//! Models and datasets named on the command line: a path that exists, or a catalog name.

use anyhow::{bail, Context, Result};
use sl_catalog::datasets;
use sl_engine::device::DeviceSpec;
use sl_engine::io::loader::WeightDType;
use sl_engine::text::prompts::read_prompts;
use sl_engine::{LoadOptions, Model, PromptRecord};
use sl_science::cosine::report::PromptSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The `--data-dir` / `--models-dir` flags of the command line being run (None: the catalog's
/// environment variables and cache decide). Held here, not in the environment, so that the
/// catalog is told its directories rather than reading them back from a mutated environment.
#[derive(Debug, Clone, Default)]
pub struct Locations {
    pub data_dir: Option<PathBuf>,
    pub models_dir: Option<PathBuf>,
    /// `--dtype`: the precision model weights are held in.
    pub dtype: Option<WeightDType>,
    /// `--device`: where models run (None: the build's default, see `sl_engine::device::open`).
    pub device: Option<DeviceSpec>,
}

static LOCATIONS: RwLock<Locations> = RwLock::new(Locations {
    data_dir: None,
    models_dir: None,
    dtype: None,
    device: None,
});

/// Records the flags of a command line; a flag left out keeps an earlier command line's value
/// (the demo runs its stages as nested command lines).
pub fn set_locations(flags: Locations) {
    let mut l = LOCATIONS.write().unwrap_or_else(|e| e.into_inner());
    if flags.data_dir.is_some() {
        l.data_dir = flags.data_dir;
    }
    if flags.models_dir.is_some() {
        l.models_dir = flags.models_dir;
    }
    if flags.dtype.is_some() {
        l.dtype = flags.dtype;
    }
    if flags.device.is_some() {
        l.device = flags.device;
    }
}

fn locations() -> Locations {
    LOCATIONS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Where datasets come from: `--data-dir`, else SAFETY_LAYERS_DATA, then the cache.
pub fn data_options() -> datasets::DataOptions {
    datasets::DataOptions::from_env_with(locations().data_dir)
}

/// Where models come from: `--models-dir`, else SAFETY_LAYERS_MODELS, then the cache.
pub fn model_options() -> sl_catalog::models::ModelOptions {
    sl_catalog::models::ModelOptions::from_env_with(locations().models_dir)
}

/// A model path, or a catalog name resolved to one (fetched and verified if needed).
pub fn model_path(spec: &Path) -> Result<PathBuf> {
    let s = spec.to_string_lossy();
    let (p, _) = sl_catalog::models::resolve_model(&s, &model_options())?;
    Ok(p)
}

/// Loads a model with the allocator tuned for loading (the binary owns its process; see
/// `sl_engine::tune_allocator_around`).
pub fn load_model(spec: &Path) -> Result<Model> {
    // The device first: a bad --device fails before minutes of loading.
    let device = sl_engine::device::open(locations().device)?;
    let mut m = load_on_cpu(spec)?;
    m.to_device(&device)?;
    Ok(m)
}

/// Loads a model for training on the `--device` (the trainer computes in f32 everywhere; on a
/// GPU through its portable path).
pub fn load_model_for_training(spec: &Path) -> Result<Model> {
    let device = sl_engine::device::open(locations().device)?;
    let mut m = load_on_cpu(spec)?;
    m.to_device_as(&device, candle_core::DType::F32)?;
    Ok(m)
}

fn load_on_cpu(spec: &Path) -> Result<Model> {
    let p = model_path(spec)?;
    let opts = LoadOptions {
        tune_malloc: true,
        dtype: locations().dtype.unwrap_or_default(),
    };
    Model::load_with(&p, &opts).with_context(|| format!("cannot load model {}", spec.display()))
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
            "prompts `{spec}`: no such file, and {}",
            datasets::unknown(spec)
        );
    };
    if column.is_some() {
        bail!("--column applies to prompt files, not to the dataset `{spec}`");
    }
    let files = datasets::resolve(&ds, &data_options())?;
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
    let files = datasets::resolve(&ds, &data_options())?;
    let [file] = files.as_slice() else {
        bail!("dataset `{spec}` is not a single training file")
    };
    Ok(Some((file.path.clone(), file.sha256.clone())))
}

pub fn prompt_set(spec: &str) -> Result<PromptSet> {
    prompt_set_with(spec, None)
}
