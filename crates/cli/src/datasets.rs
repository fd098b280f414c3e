//! Models and datasets named on the command line: a path that exists, or a catalog name.

use anyhow::Result;
use sl_catalog::datasets;
use sl_engine::device::DeviceSpec;
use sl_engine::io::loader::WeightDType;
use sl_engine::Model;
use sl_science::cosine::report::PromptSet;
use sl_science::inputs;
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
    inputs::model_path(spec, &model_options())
}

fn model_source() -> inputs::ModelSource {
    let l = locations();
    inputs::ModelSource {
        models: model_options(),
        dtype: l.dtype,
        device: l.device,
        // The binary owns its process, so it tunes the allocator for loading.
        tune_malloc: true,
    }
}

/// Loads a model on the `--device`.
pub fn load_model(spec: &Path) -> Result<Model> {
    inputs::load_model(spec, &model_source(), false)
}

/// Loads a model for training on the `--device` (the trainer computes in f32 everywhere; on a
/// GPU through its portable path).
pub fn load_model_for_training(spec: &Path) -> Result<Model> {
    inputs::load_model(spec, &model_source(), true)
}

/// A prompt set from a file (with an optional column) or a dataset name.
pub fn prompt_set_with(spec: &str, column: Option<&str>) -> Result<PromptSet> {
    inputs::prompt_set(spec, column, &data_options())
}

/// The file of a single-file dataset, resolved and verified: `(path, sha256)`; None when `spec`
/// is not a dataset name.
pub fn dataset_file(spec: &str) -> Result<Option<(PathBuf, String)>> {
    inputs::dataset_file(spec, &data_options())
}

pub fn prompt_set(spec: &str) -> Result<PromptSet> {
    prompt_set_with(spec, None)
}
