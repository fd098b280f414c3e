//! `safety-layers demo`: the paper end to end on a model organism that fits a laptop CPU.
//! Every stage is a command line of this tool (recorded in the report, rerunnable by hand); each
//! stage's output is cached under DIR by a hash of its command and of its inputs' hashes, so a
//! rerun resumes where the last one stopped.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sl_catalog::datasets;
use sl_science::report::read_json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// smoke (tiny, minutes, for CI), quick (the README's run, < 30 min on 2 cores) or paper
    /// (the paper's set sizes and epochs; hours on a CPU)
    #[arg(long, default_value = "quick")]
    pub profile: String,
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Base chat model (catalog name, directory or .gguf)
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Set sizes and settings of a profile. `None` = the whole set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub align_harmful: usize,
    pub align_benign: usize,
    pub align_answer_tokens: usize,
    pub align_epochs: usize,
    pub align_lr: f64,
    pub cosine_pairs: &'static str,
    pub locate_queries: Option<usize>,
    pub locate_alpha: &'static str,
    pub locate_tokens: usize,
    pub ft_sets: &'static [&'static str],
    pub ft_records: Option<usize>,
    pub ft_epochs: usize,
    pub ft_lr: f64,
    pub ft_warmup: usize,
    pub ft_batch: usize,
    pub ft_accum: usize,
    pub ft_max_len: usize,
    pub eval_limit: Option<usize>,
    pub eval_tokens: usize,
    pub utility_n: usize,
    pub utility_tokens: usize,
}

pub fn profile(name: &str) -> Result<Profile> {
    Ok(match name {
        "smoke" => Profile {
            name: "smoke",
            align_harmful: 16,
            align_benign: 16,
            align_answer_tokens: 12,
            align_epochs: 1,
            align_lr: 2e-4,
            cosine_pairs: "100",
            locate_queries: Some(12),
            locate_alpha: "1.2",
            locate_tokens: 6,
            ft_sets: &["finetune-implicit"],
            ft_records: Some(12),
            ft_epochs: 1,
            ft_lr: 1e-4,
            ft_warmup: 1,
            ft_batch: 4,
            ft_accum: 1,
            ft_max_len: 80,
            eval_limit: Some(8),
            eval_tokens: 12,
            utility_n: 4,
            utility_tokens: 16,
        },
        "quick" => Profile {
            name: "quick",
            align_harmful: 64,
            align_benign: 128,
            align_answer_tokens: 32,
            align_epochs: 2,
            align_lr: 2e-4,
            cosine_pairs: "all",
            locate_queries: Some(128),
            locate_alpha: "auto",
            locate_tokens: 10,
            ft_sets: &["finetune-implicit"],
            ft_records: Some(64),
            ft_epochs: 1,
            ft_lr: 1e-4,
            ft_warmup: 2,
            ft_batch: 8,
            ft_accum: 1,
            ft_max_len: 128,
            eval_limit: Some(64),
            eval_tokens: 16,
            utility_n: 32,
            utility_tokens: 48,
        },
        "paper" => Profile {
            name: "paper",
            align_harmful: 800,
            align_benign: 800,
            align_answer_tokens: 96,
            align_epochs: 3,
            align_lr: 1e-4,
            cosine_pairs: "500",
            locate_queries: None,
            locate_alpha: "auto",
            locate_tokens: 16,
            ft_sets: &["finetune-normal", "finetune-implicit"],
            ft_records: None,
            ft_epochs: 3,
            ft_lr: 1e-4,
            ft_warmup: 100,
            ft_batch: 4,
            ft_accum: 32,
            ft_max_len: 256,
            eval_limit: None,
            eval_tokens: 64,
            utility_n: 500,
            utility_tokens: 128,
        },
        _ => bail!("unknown --profile `{name}` (expected smoke, quick or paper)"),
    })
}

/// One stage's record in results.json.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageRecord {
    pub name: String,
    pub command: String,
    pub key: String,
    pub seconds: f64,
    pub cached: bool,
}

const STAGE_FILE: &str = ".stage.json";

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// Runs `args` (a command line of this tool whose output is `dir`) unless `dir` already holds
/// the output of the same command with the same inputs.
fn stage(name: &str, dir: &Path, args: Vec<String>, deps: &[&StageRecord]) -> Result<StageRecord> {
    let command = std::iter::once("safety-layers".to_string())
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let mut h = format!("{}\n{command}\n", env!("CARGO_PKG_VERSION"));
    for d in deps {
        h.push_str(&d.key);
    }
    let key = sl_science::sha256_hex(h.as_bytes());
    let marker = dir.join(STAGE_FILE);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            if v["key"] == key.as_str() {
                eprintln!("demo: {name}: cached ({})", dir.display());
                return Ok(StageRecord {
                    name: name.into(),
                    command,
                    key,
                    seconds: v["seconds"].as_f64().unwrap_or(0.0),
                    cached: true,
                });
            }
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot clear stale stage output {}", dir.display()))?;
    }
    eprintln!("demo: {name}: {command}");
    let t0 = Instant::now();
    crate::run_command_line(&args)
        .with_context(|| format!("demo stage `{name}` failed ({command})"))?;
    let seconds = t0.elapsed().as_secs_f64();
    let rec = StageRecord {
        name: name.into(),
        command,
        key,
        seconds,
        cached: false,
    };
    sl_engine::io::atomic::write_atomic(
        &marker,
        serde_json::to_string_pretty(
            &json!({"key": rec.key, "seconds": seconds, "command": rec.command}),
        )?
        .as_bytes(),
    )?;
    Ok(rec)
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// A range as wide as `first..=last`, away from it: at the bottom if it fits below, else at the
/// top (the paper's Table 8 freezes such ranges as controls).
pub fn control_range(first: usize, last: usize, layers: usize) -> (usize, usize) {
    let w = last - first + 1;
    if w <= first {
        (0, w - 1)
    } else {
        (layers - w, layers - 1)
    }
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let p = profile(&a.profile)?;
    let t0 = Instant::now();
    let out = &a.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let d = |n: &str| out.join(n).display().to_string();

    // 1. Fetch the base model and every dataset the stages read.
    let t_fetch = Instant::now();
    let base_path = crate::datasets::model_path(Path::new(&a.model))?;
    let base_sha = if base_path.is_file() {
        sl_science::sha256_hex(&std::fs::read(&base_path)?)
    } else {
        "directory".into()
    };
    let mut data_shas = serde_json::Map::new();
    let opts = crate::datasets::data_options();
    for name in [
        "advbench",
        "over-rejection",
        "xstest",
        "paper-normal",
        "paper-malicious",
        "paper-advbench",
        "finetune-normal",
        "finetune-implicit",
        "harmbench",
        "strongreject",
        "jailbreakbench",
        "malicious-instruct",
        "tdc2023",
        "alpaca",
    ] {
        let ds = datasets::dataset(name).expect("catalog name");
        let files = datasets::resolve(&ds, &opts)?;
        data_shas.insert(
            name.into(),
            json!(files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>()),
        );
    }
    let fetch_seconds = t_fetch.elapsed().as_secs_f64();
    let base = base_path.display().to_string();
    let base_rec = StageRecord {
        name: "fetch".into(),
        command: format!("safety-layers data fetch (model {})", a.model),
        key: base_sha.clone(),
        seconds: fetch_seconds,
        cached: false,
    };

    // 2. Align the base model into the organism.
    let align = stage(
        "align",
        &out.join("aligned"),
        vec![
            s("align"),
            s("--model"),
            base.clone(),
            s("--out"),
            d("aligned"),
            s("--harmful-n"),
            s(p.align_harmful),
            s("--benign-n"),
            s(p.align_benign),
            s("--answer-tokens"),
            s(p.align_answer_tokens),
            s("--epochs"),
            s(p.align_epochs),
            s("--lr"),
            s(p.align_lr),
            s("--seed"),
            s(a.seed),
        ],
        &[&base_rec],
    )?;

    // 3. Cosine analysis of the aligned model against the base.
    let cosine = stage(
        "cosine",
        &out.join("cosine"),
        vec![
            s("cosine"),
            s("--model"),
            d("aligned"),
            s("--compare"),
            base.clone(),
            s("--pairs"),
            s(p.cosine_pairs),
            s("--seed"),
            s(a.seed),
            s("--out"),
            d("cosine"),
        ],
        &[&align],
    )?;

    // 4. Locate the safety layers.
    let mut loc_args = vec![
        s("locate"),
        s("--model"),
        d("aligned"),
        s("--cosine"),
        out.join("cosine/cosine.json").display().to_string(),
        s("--alpha"),
        s(p.locate_alpha),
        s("--max-new-tokens"),
        s(p.locate_tokens),
        s("--out"),
        d("locate"),
    ];
    if let Some(n) = p.locate_queries {
        loc_args.extend([s("--limit"), s(n)]);
    }
    let locate = stage("locate", &out.join("locate"), loc_args, &[&cosine])?;
    let loc = read_json(&out.join("locate/locate.json"))?;
    let (first, last) = (
        loc["range"]["first"].as_u64().unwrap_or(0) as usize,
        loc["range"]["last"].as_u64().unwrap_or(0) as usize,
    );
    let layers = read_json(&out.join("aligned/config.json"))?["num_hidden_layers"]
        .as_u64()
        .context("aligned/config.json: num_hidden_layers")? as usize;
    let control = control_range(first, last, layers);

    // 5. Fine-tune the aligned model: full, SPPFT, control freeze.
    let mut runs = vec![];
    let mut ft_stages = vec![];
    for set in p.ft_sets {
        let tag = if *set == "finetune-implicit" {
            "di"
        } else {
            "dn"
        };
        for (variant, freeze) in [
            ("full", None),
            ("sppft", Some((first, last))),
            ("control", Some(control)),
        ] {
            let name = format!("ft-{tag}-{variant}");
            let mut args = vec![
                s("finetune"),
                s("--model"),
                d("aligned"),
                s("--data"),
                s(set),
                s("--out"),
                d(&name),
                s("--epochs"),
                s(p.ft_epochs),
                s("--lr"),
                s(p.ft_lr),
                s("--warmup-steps"),
                s(p.ft_warmup),
                s("--batch-size"),
                s(p.ft_batch),
                s("--grad-accum"),
                s(p.ft_accum),
                s("--max-len"),
                s(p.ft_max_len),
                s("--holdout"),
                s(0),
                s("--seed"),
                s(a.seed),
            ];
            if let Some(n) = p.ft_records {
                args.extend([s("--limit"), s(n)]);
            }
            if let Some((i, j)) = freeze {
                args.extend([s("--freeze"), format!("{i}-{j}")]);
            }
            let rec = stage(&name, &out.join(&name), args, &[&locate])?;
            runs.push(json!({"name": name, "data": set, "variant": variant, "freeze": freeze.map(|(i, j)| json!({"first": i, "last": j}))}));
            ft_stages.push(rec);
        }
    }

    // 6. Evaluate every model.
    let mut eval_args = vec![
        s("eval"),
        s("--model"),
        format!("base={base}"),
        s("--model"),
        format!("aligned={}", d("aligned")),
    ];
    for r in &runs {
        let n = r["name"].as_str().unwrap_or_default();
        eval_args.extend([s("--model"), format!("{n}={}", d(n))]);
    }
    eval_args.extend([
        s("--max-new-tokens"),
        s(p.eval_tokens),
        s("--utility-n"),
        s(p.utility_n),
        s("--utility-max-new-tokens"),
        s(p.utility_tokens),
        s("--out"),
        d("eval"),
    ]);
    if let Some(n) = p.eval_limit {
        eval_args.extend([s("--limit"), s(n)]);
    }
    let deps: Vec<&StageRecord> = std::iter::once(&align).chain(ft_stages.iter()).collect();
    let eval = stage("eval", &out.join("eval"), eval_args, &deps)?;

    // 7. The report.
    let mut stages = vec![base_rec, align, cosine, locate];
    stages.extend(ft_stages);
    stages.push(eval);
    let provenance = json!({
        "tool": format!("safety-layers {}", env!("CARGO_PKG_VERSION")),
        "profile": p,
        "seed": a.seed,
        "base_model": {"name": a.model, "path": base, "sha256": base_sha},
        "datasets_sha256": data_shas,
        "machine": machine(),
        "stages": stages,
        "control_range": {"first": control.0, "last": control.1},
        "finetune_runs": runs,
        "total_seconds": t0.elapsed().as_secs_f64(),
    });
    let t_rep = Instant::now();
    sl_science::report::write(out, &provenance)?;
    eprintln!(
        "demo: report {:.1} s; total {:.0} s -> {}",
        t_rep.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        out.join("report.html").display()
    );
    Ok(())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().next().map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse::<f64>()
                .unwrap_or(0.0)
                / 1048576.0
        })
    });
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu,
        "memory_gib": mem,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_ranges_are_equally_wide_and_disjoint() {
        assert_eq!(control_range(8, 10, 30), (0, 2));
        assert_eq!(control_range(1, 5, 30), (25, 29));
        assert_eq!(control_range(0, 0, 4), (3, 3));
        for (i, j) in [(8, 10), (1, 5), (0, 0), (3, 3)] {
            let (a, b) = control_range(i, j, 30);
            assert_eq!(b - a, j - i);
            assert!(b < i || a > j);
        }
    }

    #[test]
    fn profiles_exist_and_unknown_is_an_error() {
        for n in ["smoke", "quick", "paper"] {
            assert_eq!(profile(n).unwrap().name, n);
        }
        assert!(profile("fast").is_err());
    }
}
