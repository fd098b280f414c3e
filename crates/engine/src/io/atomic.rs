//! Outputs that are either complete or absent: files written to a temporary sibling and renamed
//! into place, directories staged beside their destination and renamed when complete.
//!
//! Temporaries are named `.<name>.tmp-<pid>`. A killed process leaves its temporary behind; the
//! next writer of the same name removes those of processes no longer running, and no reader
//! ever takes a dot-named `.tmp-` entry for an output.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The temporary sibling `.<name>.tmp-<pid>` of `dest`, its directory created and the
/// temporaries of dead writers of the same name removed.
fn temp_sibling(dest: &Path) -> Result<PathBuf> {
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
    remove_stale_temporaries(dir, &name);
    Ok(dir.join(format!("{}{}", temp_prefix(&name), std::process::id())))
}

/// Writes a file atomically: a temporary sibling renamed into place once complete.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(dest)?;
    if let Err(e) = write_synced(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))
}

/// A file written as a stream and moved into place only by `commit`; dropped uncommitted, its
/// temporary is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        let tmp = temp_sibling(dest)?;
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    pub fn writer(&mut self) -> &mut impl std::io::Write {
        self.file.as_mut().expect("open until committed")
    }

    pub fn commit(mut self) -> Result<()> {
        use std::io::Write;
        let mut f = self.file.take().expect("open until committed");
        f.flush()
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all().ok();
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` and flushes them to disk, so that a rename after it never exposes a
/// file whose data is still only in memory (a power loss would otherwise leave it empty).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_data())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Removes directory `dir` so that a kill at any moment leaves it whole or gone: it is first
/// renamed to its temporary sibling (one atomic step), then deleted; a kill during the deletion
/// leaves only a temporary, which the next call (or writer of the name) sweeps. Absent is not an
/// error; dead writers' temporaries of the name are removed either way.
pub fn remove_dir(dir: &Path) -> Result<()> {
    let tmp = temp_sibling(dir)?;
    if !dir.exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::rename(dir, &tmp).with_context(|| format!("cannot remove {}", dir.display()))?;
    std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))
}

/// Removes `dir/.<name>.tmp-<pid>` entries left by killed processes (those whose pid no longer
/// runs). A live writer's temporary is left alone; so is anything this cannot parse.
pub fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = temp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// The start of every temporary of `name`: `.<name>.tmp-`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// Whether `dir` holds a temporary of `name` (a live or a dead writer's).
pub fn has_temporary(dir: &Path, name: &str) -> bool {
    let prefix = temp_prefix(name);
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

/// Whether process `pid` exists (Linux: /proc/<pid>; elsewhere assumed alive, so nothing of a
/// possibly running writer is removed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
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
        remove_stale_temporaries(parent, &name);
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

    /// The staging directory, for writers that fill it themselves (a nested run's outputs).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_synced(&self.tmp.join(name), bytes)
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
        // An old config.json would vouch for a directory whose other files are half replaced.
        if names.iter().any(|n| n == "config.json") {
            match std::fs::remove_file(dir.join("config.json")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot replace {}", dir.display()))
                }
                _ => {}
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        // No process has pid 4294967295 (Linux caps pids at 2^22).
        let dead_file = d.path().join(".out.json.tmp-4294967295");
        let dead_dir = d.path().join(".model.tmp-4294967295");
        let mine = d
            .path()
            .join(format!(".out.json.tmp-{}", std::process::id()));
        let other = d.path().join(".other.json.tmp-4294967295");
        std::fs::write(&dead_file, "half").unwrap();
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("config.json"), "{").unwrap();
        std::fs::write(&other, "x").unwrap();
        write_atomic(&d.path().join("out.json"), b"{}").unwrap();
        assert!(!dead_file.exists() && !mine.exists());
        assert!(
            other.exists(),
            "another name's temporary is not this writer's to remove"
        );
        let stage = StagedDir::new(&d.path().join("model")).unwrap();
        assert!(
            !dead_dir.exists(),
            "a killed writer's staging directory is removed"
        );
        stage.write("config.json", b"{}").unwrap();
        stage.commit().unwrap();
        assert_eq!(
            std::fs::read(d.path().join("model/config.json")).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn a_removed_directory_is_gone_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("checkpoints");
        std::fs::create_dir_all(dir.join("step-1")).unwrap();
        std::fs::write(dir.join("step-1/state.json"), "{}").unwrap();
        let dead = d.path().join(".checkpoints.tmp-4294967295");
        std::fs::create_dir(&dead).unwrap();
        remove_dir(&dir).unwrap();
        remove_dir(&dir).unwrap(); // absent: not an error
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn committing_into_a_directory_drops_its_old_config_first() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "old").unwrap();
        let stage = StagedDir::new(&d.path().join(".m")).unwrap();
        stage.write("weights", b"w").unwrap();
        stage.write("config.json", b"new").unwrap();
        stage.commit_into(d.path()).unwrap();
        assert_eq!(std::fs::read(d.path().join("config.json")).unwrap(), b"new");
        assert!(!d.path().join(".m").exists());
    }
}
