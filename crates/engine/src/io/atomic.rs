//! Outputs that are either complete or absent: files written to a temporary sibling and renamed
//! into place, directories staged beside their destination and renamed when complete.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Writes a file atomically: a temporary sibling renamed into place once complete.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))
}

/// True when `p` exists and is not an empty directory (an output there would mix with old files).
pub fn occupied(p: &Path) -> bool {
    p.exists()
        && std::fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
}

/// A directory being written: files go to `<dest>.tmp-<pid>`, `commit` renames it to `dest`.
pub struct StagedDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedDir {
    pub fn new(dest: &Path) -> Result<StagedDir> {
        if occupied(dest) {
            bail!(
                "output directory {} already exists and is not empty",
                dest.display()
            );
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "out".into());
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(StagedDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.tmp.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))
    }

    pub fn write_json(&self, name: &str, v: &serde_json::Value) -> Result<()> {
        self.write(name, serde_json::to_string_pretty(v)?.as_bytes())
    }

    pub fn commit(mut self) -> Result<()> {
        if self.dest.exists() {
            std::fs::remove_dir(&self.dest)
                .with_context(|| format!("cannot replace empty {}", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })?;
        self.committed = true;
        Ok(())
    }
}

impl StagedDir {
    /// Moves the staged files into the existing directory `dir` (replacing files of the same
    /// name), `config.json` last so that a directory with a config is always complete.
    pub fn commit_into(mut self, dir: &Path) -> Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(&self.tmp)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort_by_key(|n| n == "config.json");
        for n in names {
            std::fs::rename(self.tmp.join(&n), dir.join(&n))
                .with_context(|| format!("cannot move {:?} into {}", n, dir.display()))?;
        }
        std::fs::remove_dir(&self.tmp)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
