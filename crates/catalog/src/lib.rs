//! Models and datasets by short name, resolved to verified local files: a local directory
//! first, then the cache (`$XDG_CACHE_HOME/safety-layers`, else `~/.cache/safety-layers`), then a
//! fetch whose result is checked against its sha256 before it is moved into the cache, so a
//! half-fetched or altered file never counts as present.

pub mod datasets;
pub mod models;
mod suggest;

pub use suggest::{closest, did_you_mean};

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a resolved file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    DataDir,
    ModelsDir,
    Cache,
    Downloaded,
    Path,
}

pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("safety-layers");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("safety-layers")
}

pub fn sha256_reader(mut r: impl Read) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sha256_reader(std::io::BufReader::new(f))
}

/// A temporary file name beside `dest`, unique to this process.
pub(crate) fn temp_beside(dest: &Path) -> Result<PathBuf> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(dir.join(format!(".{name}.part-{}", std::process::id())))
}

/// Checks `tmp` against `sha256` and moves it to `dest`; removes it on a mismatch.
pub(crate) fn verify_and_place(tmp: &Path, dest: &Path, sha256: &str, what: &str) -> Result<()> {
    let got = sha256_file(tmp)?;
    if got != sha256 {
        let _ = std::fs::remove_file(tmp);
        bail!("{what}: sha256 of the fetched file is {got}, expected {sha256}; nothing was kept");
    }
    std::fs::rename(tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))
}

/// Downloads `url` with the system `curl` (no TLS library is linked into this program), then
/// verifies and places it.
pub fn fetch_url(url: &str, dest: &Path, sha256: &str) -> Result<()> {
    let tmp = temp_beside(dest)?;
    let out = Command::new("curl")
        .args(["-fsSL", "--retry", "2", "-o"])
        .arg(&tmp)
        .arg(url)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => bail!(
            "cannot run `curl` to fetch {url} ({e}); install curl or place the file at {} by hand",
            dest.display()
        ),
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "fetching {url} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    verify_and_place(&tmp, dest, sha256, url)
}
