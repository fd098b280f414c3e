//! `sl-fuzz`: a fuzz harness for stable Rust (cargo-fuzz needs nightly).
//!
//! The supervisor runs each target in a worker process: the worker makes input i from
//! (seed, i) alone — regression inputs first, then the seeds, then mutations — writes it where
//! the parser reads it, and reports each input before and after. A panic, an abort (the memory
//! cap of `alloc.rs`, a stack overflow) or an input that runs past the time bound ends the worker;
//! the supervisor regenerates that input, saves it as a finding and starts a new worker after it.
//! An error that does not name the file is a finding too.
//!
//! `sl-fuzz [--target NAME]... [--seconds S] [--execs N] [--seed N] [--out DIR]`

mod alloc;
mod mutate;
mod targets;
mod worker;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One input may take this long before it counts as a hang.
const HANG: Duration = Duration::from_secs(10);

struct Args {
    targets: Vec<String>,
    seconds: f64,
    execs: u64,
    seed: u64,
    out: PathBuf,
    worker: Option<worker::Job>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        targets: vec![],
        seconds: 10.0,
        execs: u64::MAX,
        seed: 1,
        out: PathBuf::from("target/fuzz"),
        worker: None,
    };
    let mut it = std::env::args().skip(1);
    let mut start = 0u64;
    let mut is_worker = false;
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => a.targets.push(val()?),
            "--seconds" => a.seconds = val()?.parse().context("--seconds")?,
            "--execs" => a.execs = val()?.parse().context("--execs")?,
            "--seed" => a.seed = val()?.parse().context("--seed")?,
            "--out" => a.out = PathBuf::from(val()?),
            "--worker-start" => {
                is_worker = true;
                start = val()?.parse().context("--worker-start")?;
            }
            "-h" | "--help" => {
                let names: Vec<_> = targets::all().iter().map(|t| t.name).collect();
                println!(
                    "sl-fuzz [--target NAME]... [--seconds S per target] [--execs N per target] \
                     [--seed N] [--out DIR]\ntargets: {}",
                    names.join(", ")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (see --help)"),
        }
    }
    if is_worker {
        let [name] = a.targets.as_slice() else {
            bail!("a worker runs exactly one --target")
        };
        a.worker = Some(worker::Job {
            target: name.clone(),
            seed: a.seed,
            start,
            end: a.execs,
            scratch: a.out.join("scratch").join(name),
        });
    }
    Ok(a)
}

/// What the supervisor learned about one target.
#[derive(serde::Serialize)]
struct Summary {
    target: String,
    execs: u64,
    seconds: f64,
    execs_per_second: f64,
    worst_peak_bytes: usize,
    worst_peak_input_len: usize,
    findings: Vec<Finding>,
}

#[derive(serde::Serialize, Clone)]
struct Finding {
    kind: String,
    input: u64,
    saved: String,
    message: String,
}

fn supervise(a: &Args, ctx: &targets::Ctx) -> Result<Vec<Summary>> {
    let all = targets::all();
    let chosen: Vec<&targets::Target> = if a.targets.is_empty() {
        all.iter().collect()
    } else {
        a.targets
            .iter()
            .map(|n| {
                all.iter().find(|t| t.name == n).with_context(|| {
                    let names: Vec<_> = all.iter().map(|t| t.name).collect();
                    format!("unknown target `{n}` (targets: {})", names.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for t in chosen {
        let inputs = worker::Inputs::new(t, ctx, a.seed)?;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(a.seconds);
        let mut s = Summary {
            target: t.name.into(),
            execs: 0,
            seconds: 0.0,
            execs_per_second: 0.0,
            worst_peak_bytes: 0,
            worst_peak_input_len: 0,
            findings: vec![],
        };
        let mut next = 0u64;
        while next < a.execs && Instant::now() < deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            let mut child = Command::new(&exe)
                .args(["--target", t.name, "--seed", &a.seed.to_string()])
                .args([
                    "--worker-start",
                    &next.to_string(),
                    "--execs",
                    &a.execs.to_string(),
                ])
                .arg("--out")
                .arg(&a.out)
                .env("SL_FUZZ_SECONDS", format!("{left}"))
                // An error that captures a backtrace (candle's do under RUST_BACKTRACE=1) would
                // symbolize it under the memory cap, and an allocation failing while the
                // backtrace lock is held deadlocks the abort: a false hang.
                .env("RUST_BACKTRACE", "0")
                .env("RUST_LIB_BACKTRACE", "0")
                .env("SL_FUZZ_ROOT", &ctx.root)
                .env("SL_FUZZ_SHARED", &ctx.shared)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot start a fuzz worker")?;
            let (tx, rx) = mpsc::channel::<String>();
            let stdout = child.stdout.take().expect("piped");
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let stderr = child.stderr.take().expect("piped");
            let err_tail = std::thread::spawn(move || {
                let mut tail = std::collections::VecDeque::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    tail.push_back(line);
                    if tail.len() > 20 {
                        tail.pop_front();
                    }
                }
                tail.into_iter().collect::<Vec<_>>().join("\n")
            });
            let mut current: Option<u64> = None;
            let mut hung = false;
            loop {
                match rx.recv_timeout(HANG) {
                    Ok(line) => {
                        let mut f = line.splitn(4, ' ');
                        match (f.next(), f.next().and_then(|x| x.parse::<u64>().ok())) {
                            (Some("S"), Some(i)) => current = Some(i),
                            (Some("D"), Some(i)) => {
                                let peak: usize =
                                    f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                                let len: usize = f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                                if peak > s.worst_peak_bytes {
                                    s.worst_peak_bytes = peak;
                                    s.worst_peak_input_len = len;
                                }
                                s.execs += 1;
                                current = None;
                                next = i + 1;
                            }
                            (Some("F"), Some(i)) => {
                                let rest: Vec<&str> = f.collect();
                                let (kind, msg) = (
                                    rest.first().copied().unwrap_or("?"),
                                    rest.get(1).copied().unwrap_or(""),
                                );
                                s.findings.push(save(a, t.name, &inputs, i, kind, msg)?);
                            }
                            _ => {}
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if current.is_some() => {
                        let _ = child.kill();
                        hung = true;
                        break;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            let status = child.wait()?;
            let tail = err_tail.join().unwrap_or_default();
            if let Some(i) = current {
                let kind = if hung { "hang" } else { "crash" };
                let msg = if hung {
                    format!("no answer within {} s", HANG.as_secs())
                } else {
                    format!("{status}: {}", tail.lines().last().unwrap_or(""))
                };
                s.findings.push(save(a, t.name, &inputs, i, kind, &msg)?);
                s.execs += 1;
                next = i + 1;
            } else if !status.success() {
                bail!(
                    "fuzz worker for {} failed outside an input: {status}\n{tail}",
                    t.name
                );
            }
        }
        s.seconds = t0.elapsed().as_secs_f64();
        s.execs_per_second = s.execs as f64 / s.seconds.max(1e-9);
        println!(
            "{:<22} {:>9} execs {:>8.0}/s  worst peak {:>10} B (input {} B)  findings {}",
            s.target,
            s.execs,
            s.execs_per_second,
            s.worst_peak_bytes,
            s.worst_peak_input_len,
            s.findings.len()
        );
        for f in &s.findings {
            println!(
                "  {} at input {}: {} -> {}",
                f.kind, f.input, f.message, f.saved
            );
        }
        out.push(s);
    }
    Ok(out)
}

/// Saves input `i` of a target as a finding file and describes it.
fn save(
    a: &Args,
    target: &str,
    inputs: &worker::Inputs,
    i: u64,
    kind: &str,
    msg: &str,
) -> Result<Finding> {
    let dir = a.out.join("findings").join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{kind}-{i}.bin"));
    std::fs::write(&path, inputs.get(i))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Finding {
        kind: kind.into(),
        input: i,
        saved: path.display().to_string(),
        message: msg.into(),
    })
}

fn ctx_from_env() -> targets::Ctx {
    let root = std::env::var_os("SL_FUZZ_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let shared = std::env::var_os("SL_FUZZ_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared"));
    targets::Ctx { root, shared }
}

fn main() {
    let run = || -> Result<bool> {
        let a = parse_args()?;
        let ctx = ctx_from_env();
        if let Some(job) = &a.worker {
            worker::run(job, &ctx)?;
            return Ok(true);
        }
        let summaries = supervise(&a, &ctx)?;
        std::fs::create_dir_all(&a.out)?;
        let path = a.out.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summaries)?)?;
        let n: usize = summaries.iter().map(|s| s.findings.len()).sum();
        println!(
            "{} targets, {n} findings; summary in {}",
            summaries.len(),
            path.display()
        );
        Ok(n == 0)
    };
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("sl-fuzz: {e:#}");
            std::process::exit(2);
        }
    }
}
