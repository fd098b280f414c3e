//! The worker side: inputs made from (seed, index) alone, each parsed under the memory cap,
//! with a line to the supervisor before (`S i`) and after (`D i peak len`) and one per finding
//! (`F i kind message`).

use crate::alloc;
use crate::mutate::{self, Rng};
use crate::targets::{self, Ctx, Target};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Job {
    pub target: String,
    pub seed: u64,
    pub start: u64,
    pub end: u64,
    pub scratch: PathBuf,
}

/// The inputs of one target: committed regression inputs, then the seeds, then mutations.
pub struct Inputs {
    regressions: Vec<Vec<u8>>,
    seeds: Vec<Vec<u8>>,
    mutate: Option<targets::Mutate>,
    max_len: usize,
    seed: u64,
}

impl Inputs {
    pub fn new(t: &Target, ctx: &Ctx, seed: u64) -> Result<Inputs> {
        let dir = ctx.root.join("crates/fuzz/regressions").join(t.name);
        let mut regressions = Vec::new();
        if dir.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .collect();
            files.sort();
            for f in files {
                regressions.push(targets::read_seed(&f)?);
            }
        }
        let seeds = (t.seeds)(ctx).with_context(|| format!("seeds of fuzz target {}", t.name))?;
        anyhow::ensure!(!seeds.is_empty(), "fuzz target {} has no seeds", t.name);
        Ok(Inputs {
            regressions,
            seeds,
            mutate: t.mutate,
            max_len: t.max_len,
            seed,
        })
    }

    pub fn get(&self, i: u64) -> Vec<u8> {
        let (r, s) = (self.regressions.len() as u64, self.seeds.len() as u64);
        if i < r {
            return self.regressions[i as usize].clone();
        }
        if i < r + s {
            return self.seeds[(i - r) as usize].clone();
        }
        let mut rng = Rng::new(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let base = &self.seeds[rng.below(self.seeds.len())];
        if let Some(m) = self.mutate {
            if rng.below(2) == 0 {
                if let Some(v) = m(&mut rng, base) {
                    return v;
                }
            }
        }
        let other = &self.seeds[rng.below(self.seeds.len())];
        mutate::bytes(&mut rng, base, other, self.max_len)
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One line of text, so a message fits the protocol.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " | ").chars().take(400).collect()
}

pub fn run(job: &Job, ctx: &Ctx) -> Result<()> {
    let all = targets::all();
    let t = all
        .iter()
        .find(|t| t.name == job.target)
        .context("unknown target")?;
    let inputs = Inputs::new(t, ctx, job.seed)?;
    let seconds: f64 = std::env::var("SL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    // SL_FUZZ_SHOW_ERRORS=1 logs each clean error to <out>/scratch/<target>/errors.txt (to read
    // what the parsers say).
    let show_errors = std::env::var_os("SL_FUZZ_SHOW_ERRORS").is_some();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    // Panics are caught and reported as findings; the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    let mut i = job.start;
    while i < job.end && Instant::now() < deadline {
        let input = inputs.get(i);
        let dir = job.scratch.join(format!("w{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(t.file_name);
        std::fs::write(&path, &input)
            .with_context(|| format!("cannot write {}", path.display()))?;
        say(&format!("S {i}"));
        let start = alloc::live();
        alloc::begin(
            t.mem_base
                .saturating_add(t.mem_factor.saturating_mul(input.len())),
        );
        let result = std::panic::catch_unwind(|| (t.run)(&path));
        let peak = alloc::end(start);
        match result {
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                say(&format!("F {i} panic {}", one_line(&msg)));
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                if show_errors {
                    let log = job.scratch.join("errors.txt");
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(log)?;
                    writeln!(f, "input {i}: {}", one_line(&msg))?;
                }
                if !msg.contains(t.file_name) {
                    say(&format!("F {i} unnamed-error {}", one_line(&msg)));
                }
            }
            Ok(Ok(())) => {}
        }
        say(&format!("D {i} {peak} {}", input.len()));
        i += 1;
    }
    Ok(())
}
