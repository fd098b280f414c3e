//! `safety-layers demo`: the paper end to end on a model organism that fits a laptop CPU.
//! Every stage is a command line of this tool (recorded in the report, rerunnable by hand); each
//! stage's output is cached under DIR by a hash of this build, its command and its inputs'
//! hashes, so a rerun resumes where the last one stopped (and a rebuilt tool recomputes).

use anyhow::{Context, Result};
use sl_catalog::datasets;
use sl_engine::LayerRange;
use sl_science::demo::{
    control_range, finetune_arms, profile, BaseModel, FinetuneRun, Machine, Provenance,
    StageMarker, StageRecord, STAGE_FILE,
};
use sl_science::locate::file::LocateFile;
use sl_science::report::read_json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// smoke (tiny, minutes, for CI), quick (the README's run, < 30 min on 2 cores), full (full
    /// evaluation sets, every arm with 3 seeds; about 1.5 hours on 2 cores, resumable) or paper (the
    /// paper's set sizes and epochs; days on a CPU)
    #[arg(long, default_value = "quick")]
    pub profile: String,
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Base chat model (catalog name, directory or .gguf)
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A planted organism (positive control): align trains only layers I-J (attention and MLP),
    /// so its safety behaviour lives there by construction; the report says whether cosine and
    /// locate find them, and fine-tuning gains two arms (I-J frozen, and an equally wide control
    /// freeze beside it) so that it says whether freezing the plant keeps R_h down
    #[arg(long, value_name = "I-J")]
    pub plant: Option<String>,
    /// Seeds per fine-tuning arm (default: the profile's)
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Refusal judge of locate and eval (see `eval --help`)
    #[arg(long, default_value = sl_science::judges::DEFAULT_JUDGE)]
    pub judge: String,
    /// Run nothing: rebuild report.html and results.json in --out from its finished stages and
    /// the provenance its results.json holds (after a fix to the report, without rerunning hours
    /// of stages that another build made). The provenance keeps the build that ran the stages
    /// and records this one as the report's
    #[arg(long)]
    pub report_only: bool,
}

/// `demo --report-only`.
fn rebuild_report(out: &Path) -> Result<()> {
    let path = out.join("results.json");
    let old = sl_science::report::results::ResultsFile::read(&path).with_context(|| {
        format!(
            "--report-only needs a finished demo in {} (its results.json)",
            out.display()
        )
    })?;
    let mut provenance = old.provenance;
    provenance.report_rebuilt_by = Some(tool_and_build());
    sl_science::report::write(out, &provenance)?;
    eprintln!(
        "demo: report rebuilt from the stages in {} -> {}",
        out.display(),
        out.join("report.html").display()
    );
    Ok(())
}

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

/// The running binary's identity: the sha256 of its file, so a stage cached by another build
/// (a code fix) runs again instead of being reused. Read once per process.
fn build_identity() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        match std::env::current_exe().and_then(std::fs::read) {
            Ok(bytes) => sl_science::sha256_hex(&bytes),
            Err(e) => {
                // Without it every stage still keys on version and command; say what is lost.
                eprintln!(
                    "demo: warning: cannot read this binary to identify its build ({e}); cached \
                     stages of another build of the same version would be reused"
                );
                "unknown-build".to_string()
            }
        }
    })
}

/// `safety-layers <version> (build <first 12 hex of the build identity>)`, as provenance names
/// the tool.
fn tool_and_build() -> String {
    let id = build_identity();
    format!(
        "safety-layers {} (build {})",
        env!("CARGO_PKG_VERSION"),
        &id[..12.min(id.len())]
    )
}

/// A stage's cache key: the tool's version and build, its command line, its inputs' keys.
fn stage_key(build: &str, command: &str, deps: &[&StageRecord]) -> String {
    let mut h = format!("{} {build}\n{command}\n", env!("CARGO_PKG_VERSION"));
    for d in deps {
        h.push_str(&d.key);
    }
    sl_science::sha256_hex(h.as_bytes())
}

/// Runs `args` (a command line of this tool whose output is `dir`) unless `dir` already holds
/// the output of the same command with the same inputs, made by this same build.
fn stage(name: &str, dir: &Path, args: Vec<String>, deps: &[&StageRecord]) -> Result<StageRecord> {
    let command = std::iter::once("safety-layers".to_string())
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let key = stage_key(build_identity(), &command, deps);
    let marker = dir.join(STAGE_FILE);
    if marker.exists() {
        // An unreadable marker (an older tool's, one edited by hand) only means the stage runs
        // again.
        match StageMarker::read(&marker) {
            Ok(m) if m.key == key => {
                eprintln!("demo: {name}: cached ({})", dir.display());
                return Ok(StageRecord {
                    name: name.into(),
                    command,
                    key,
                    seconds: m.seconds,
                    cached: true,
                });
            }
            Ok(_) => {}
            Err(e) => eprintln!("demo: {name}: {e:#}; running the stage again"),
        }
    }
    sl_engine::io::atomic::remove_dir(dir)
        .with_context(|| format!("cannot clear stale stage output {}", dir.display()))?;
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
    StageMarker::new(&rec).write(&marker)?;
    Ok(rec)
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

pub fn run(a: &DemoArgs) -> Result<()> {
    if a.report_only {
        return rebuild_report(&a.out);
    }
    let mut p = profile(&a.profile)?;
    if let Some(n) = a.seeds {
        anyhow::ensure!(n >= 1, "--seeds {n}: at least one seed per arm");
        p.ft_seeds = n;
    }
    // Flags the stages read late are checked before anything runs or is written: a bad judge
    // would otherwise fail at locate, after the whole alignment. The plant's bounds against the
    // model's layers are align's to check (it names --train-layers).
    if a.judge != "probe" {
        a.judge
            .parse::<sl_science::judges::JudgeKind>()
            .map_err(|e| anyhow::anyhow!("--judge: {e}"))?;
    }
    if let Some(r) = &a.plant {
        LayerRange::parse(r, usize::MAX).map_err(|e| anyhow::anyhow!("--plant: {e}"))?;
    }
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
    let mut data_shas = BTreeMap::new();
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
            name.to_string(),
            files.iter().map(|f| f.sha256.clone()).collect(),
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

    // 2. Align the base model into the organism (planted: only the named layers train).
    let mut align_args = vec![
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
    ];
    if let Some(r) = &a.plant {
        align_args.extend([s("--train-layers"), r.clone()]);
    }
    let align = stage("align", &out.join("aligned"), align_args, &[&base_rec])?;
    let planted = match &a.plant {
        Some(r) => {
            let layers = aligned_layers(out)?;
            Some(LayerRange::parse(r, layers).map_err(|e| anyhow::anyhow!("--plant: {e}"))?)
        }
        None => None,
    };

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
            s(&p.cosine_pairs),
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
        s(&p.locate_alpha),
        s("--max-new-tokens"),
        s(p.locate_tokens),
        s("--judge"),
        s(&a.judge),
        s("--out"),
        d("locate"),
    ];
    if let Some(n) = p.locate_queries {
        loc_args.extend([s("--limit"), s(n)]);
    }
    let locate = stage("locate", &out.join("locate"), loc_args, &[&cosine])?;
    let range = LocateFile::read(&out.join("locate/locate.json"))?.range;
    let (first, last) = (range.first, range.last);
    let layers = aligned_layers(out)?;
    let control = control_range(first, last, layers)?;
    if control.narrower {
        eprintln!(
            "note: no range as wide as {first}-{last} fits beside it in {layers} layers; the \
             control freeze is the narrower {}",
            control.range
        );
    }

    // 5. Fine-tune the aligned model: full, SPPFT, control freezes; each with every seed.
    let mut runs = vec![];
    let mut ft_stages = vec![];
    let arms = finetune_arms(first, last, layers, p.ft_table8, planted)?;
    for set in &p.ft_sets {
        let tag = if set == "finetune-implicit" {
            "di"
        } else {
            "dn"
        };
        for (k, (variant, freeze)) in
            (0..p.ft_seeds as u64).flat_map(|k| arms.iter().map(move |arm| (k, *arm)))
        {
            let seed = a.seed + k;
            let name = if k == 0 {
                format!("ft-{tag}-{variant}")
            } else {
                format!("ft-{tag}-{variant}-s{k}")
            };
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
                s(seed),
            ];
            if let Some(n) = p.ft_records {
                args.extend([s("--limit"), s(n)]);
            }
            if let Some(r) = freeze {
                args.extend([s("--freeze"), format!("{}-{}", r.first, r.last)]);
            }
            let rec = stage(&name, &out.join(&name), args, &[&locate])?;
            runs.push(FinetuneRun {
                name,
                data: set.clone(),
                variant: variant.into(),
                freeze,
                seed,
            });
            ft_stages.push(rec);
        }
    }

    // 6. Evaluate every model, each a stage of its own (an interrupted run keeps the models it
    // finished), then one table of them all.
    let mut models: Vec<(String, String, &StageRecord)> = vec![
        ("base".into(), base.clone(), &base_rec),
        ("aligned".into(), d("aligned"), &align),
    ];
    for (r, rec) in runs.iter().zip(&ft_stages) {
        models.push((r.name.clone(), d(&r.name), rec));
    }
    let mut eval_parts = vec![];
    for (label, path, dep) in &models {
        let dir = out.join("eval-parts").join(label);
        let mut args = vec![
            s("eval"),
            s("--model"),
            format!("{label}={path}"),
            s("--judge"),
            s(&a.judge),
            s("--max-new-tokens"),
            s(p.eval_tokens),
            s("--utility-n"),
            s(p.utility_n),
            s("--utility-max-new-tokens"),
            s(p.utility_tokens),
            s("--out"),
            dir.display().to_string(),
        ];
        if let Some(n) = p.eval_limit {
            args.extend([s("--limit"), s(n)]);
        }
        eval_parts.push((
            dir.clone(),
            stage(&format!("eval-{label}"), &dir, args, &[dep])?,
        ));
    }
    let mut merge_args = vec![s("eval")];
    for (dir, _) in &eval_parts {
        merge_args.extend([s("--responses"), dir.display().to_string()]);
    }
    merge_args.extend([s("--judge"), s(&a.judge), s("--out"), d("eval")]);
    let deps: Vec<&StageRecord> = eval_parts.iter().map(|(_, r)| r).collect();
    let eval = stage("eval", &out.join("eval"), merge_args, &deps)?;

    // 7. The report.
    let mut stages = vec![base_rec, align, cosine, locate];
    stages.extend(ft_stages);
    stages.extend(eval_parts.into_iter().map(|(_, r)| r));
    stages.push(eval);
    let provenance = Provenance {
        tool: tool_and_build(),
        profile: p,
        seed: a.seed,
        base_model: BaseModel {
            name: a.model.clone(),
            path: base,
            sha256: base_sha,
        },
        datasets_sha256: data_shas,
        machine: Machine::current(),
        stages,
        control_range: control.range,
        control_narrower: control.narrower,
        planted,
        plant_control: match planted {
            Some(p) => Some(control_range(p.first, p.last, layers)?.range),
            None => None,
        },
        finetune_runs: runs,
        total_seconds: t0.elapsed().as_secs_f64(),
        report_rebuilt_by: None,
    };
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

/// The aligned organism's layer count (from the config `align` wrote).
fn aligned_layers(out: &Path) -> Result<usize> {
    let cfg = out.join("aligned/config.json");
    Ok(read_json(&cfg)?["num_hidden_layers"]
        .as_u64()
        .with_context(|| format!("{}: num_hidden_layers", cfg.display()))? as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another build of the same version, or another input, gives another key; the same build,
    /// command and inputs the same one. The build is this binary's file hash.
    #[test]
    fn stage_keys_follow_build_command_and_inputs() {
        let dep = StageRecord {
            name: "align".into(),
            command: "safety-layers align".into(),
            key: "k1".into(),
            seconds: 1.0,
            cached: false,
        };
        let k = stage_key("build-a", "safety-layers cosine", &[&dep]);
        assert_eq!(k, stage_key("build-a", "safety-layers cosine", &[&dep]));
        assert_ne!(k, stage_key("build-b", "safety-layers cosine", &[&dep]));
        assert_ne!(
            k,
            stage_key("build-a", "safety-layers cosine --limit 2", &[&dep])
        );
        let other = StageRecord {
            key: "k2".into(),
            ..dep.clone()
        };
        assert_ne!(k, stage_key("build-a", "safety-layers cosine", &[&other]));
        let id = build_identity();
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(id, sl_science::sha256_hex(&exe));
    }
}
