//! `safety-layers locate` and `safety-layers judge`.

use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use sl_engine::{LayerRange, ScaleTarget, Template};
use sl_science::cosine::file::CosineFile;
use sl_science::judges::Judge;
use sl_science::locate::file::LocateMeta;
use sl_science::locate::report::{run, write};
use sl_science::locate::{AlphaMode, LocateConfig, Locator};
use sl_science::schema::Precision;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct LocateArgs {
    /// Model: Hugging Face directory, .gguf file or catalog name
    #[arg(long)]
    pub model: PathBuf,
    /// Over-rejection queries D_o (file or dataset name)
    #[arg(long, default_value = "over-rejection")]
    pub over_rejection: String,
    /// Initial range I-J (0-indexed, inclusive)
    #[arg(long, conflicts_with = "cosine")]
    pub initial: Option<String>,
    /// Take the initial range from a cosine.json
    #[arg(long)]
    pub cosine: Option<PathBuf>,
    /// Scaling factor, or `auto` (paper A.3.4)
    #[arg(long, default_value = "auto")]
    pub alpha: String,
    /// With --alpha auto: stop when the lower sweep's count std reaches this per 721 queries
    #[arg(long, default_value_t = 15.0)]
    pub std_threshold: f64,
    /// Refusal judge: union (gcg or xstest), gcg, xstest, or probe (first-token score,
    /// calibrated against union, or against gcg with --refusal-list)
    #[arg(long, default_value = sl_science::judges::DEFAULT_JUDGE)]
    pub judge: String,
    /// Refusal phrases, one per line, instead of the judge's default list
    #[arg(long)]
    pub refusal_list: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Bounds tried on each side of the current bound
    #[arg(long, default_value_t = 2)]
    pub span: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    /// Use only the first N queries
    #[arg(long)]
    pub limit: Option<usize>,
    /// Keep the layers below a range's lower bound (residual stream, keys/values) and reuse them
    /// for every range with that bound. Same counts; since the prompts' shared template head is
    /// computed once the saving is small and the held memory made full sweeps slower on SmolLM2
    /// (bench/RESULTS.md), so it is off by default
    #[arg(long, conflicts_with = "no_prefix_cache")]
    pub prefix_cache: bool,
    /// Recompute the layers below each range (the default)
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Generate every response to the end even when the judge has decided
    #[arg(long)]
    pub no_early_stop: bool,
    /// What the scaling multiplies: weights (the paper's: the attention and MLP matrices) or
    /// residual (each layer's attention and MLP contributions after any post-norm, which
    /// per-head q/k norms and Gemma's post-norms cannot cancel)
    #[arg(long, default_value = "weights")]
    pub scale_target: ScaleTarget,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub load: crate::LoadArgs,
}

pub fn judge_from(kind: &str, list: Option<&PathBuf>) -> Result<Judge> {
    Judge::named(kind, list.map(PathBuf::as_path))
}

fn initial_range(a: &LocateArgs, n_layers: usize) -> Result<LayerRange> {
    if let Some(s) = &a.initial {
        return LayerRange::parse(s, n_layers);
    }
    let Some(p) = &a.cosine else {
        bail!("give the initial range with --initial I-J or --cosine DIR/cosine.json");
    };
    CosineFile::initial_range(p, n_layers)
}

pub fn run_locate(a: &LocateArgs) -> Result<()> {
    let mut model = crate::datasets::load_model(&a.model)?;
    let n_layers = model.cfg().num_layers;
    let precision = Precision::of(&model);
    let initial = initial_range(a, n_layers)?;
    let alpha = AlphaMode::parse(&a.alpha, a.std_threshold)?;
    // The probe judges without generating; its threshold is calibrated against a text judge.
    let probe = a.judge == "probe";
    let judge = if probe {
        Judge::probe_reference(a.refusal_list.as_deref())?
    } else {
        judge_from(&a.judge, a.refusal_list.as_ref())?
    };
    let mut set = crate::datasets::prompt_set(&a.over_rejection)?;
    if let Some(n) = a.limit {
        set.records.truncate(n);
    }
    if set.records.is_empty() {
        bail!("the over-rejection set `{}` is empty", a.over_rejection);
    }
    let prompts = model.prompts(&set.records, a.template.parse::<Template>()?)?;
    let cfg = LocateConfig {
        alpha,
        span: a.span,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        prefix_cache: a.prefix_cache,
        early_stop: !a.no_early_stop,
        probe,
        scale_target: a.scale_target,
    };
    let scaling_notes = match a.scale_target {
        ScaleTarget::Weights => model.decoder.weight_scaling_notes(),
        ScaleTarget::Residual => vec![],
    };
    for note in &scaling_notes {
        eprintln!(
            "note: on this family {note}; --scale-target residual scales every layer's \
             contribution alike"
        );
    }
    let n = prompts.len();
    let mut loc = Locator::new(&mut model, prompts, judge, cfg)?;
    let bar = Progress::new(n, "locate (prompts judged, all runs)");
    bar.set_length_unknown();
    let res = run(&mut loc, initial, alpha, &mut |k| bar.inc(k))?;
    let judged: usize = loc.runs.len() * n;
    let generated: usize = loc
        .runs
        .values()
        .flat_map(|r| &r.responses)
        .map(|j| j.output_ids.len())
        .sum();
    bar.finish(
        judged,
        generated,
        "locate (prompts over all runs, generated tokens)",
    );
    let meta = LocateMeta {
        model: a.model.display().to_string(),
        precision: Some(precision),
        over_rejection: set.name.clone(),
        over_rejection_sha256: set.sha256.clone(),
        template: a.template.clone(),
        max_new_tokens: a.max_new_tokens,
        span: a.span,
        prefix_cache: a.prefix_cache,
        early_stop: !a.no_early_stop,
        scale_target: a.scale_target,
        scaling_notes,
    };
    write(&a.out, &loc, &res, initial, meta)?;
    eprintln!(
        "baseline: {} of {n} refused; alpha {}",
        res.baseline, res.alpha
    );
    for s in [&res.upper, &res.lower] {
        let row: Vec<String> = s
            .tried
            .iter()
            .map(|(r, c)| {
                format!(
                    "[{},{}] {}{}",
                    r.first,
                    r.last,
                    c,
                    if *r == s.best { "*" } else { "" }
                )
            })
            .collect();
        eprintln!("{} sweep: {}", s.kind, row.join(" | "));
    }
    if let Some(c) = &loc.calibration {
        eprintln!(
            "probe: threshold {:.4} calibrated on {} gcg-judged responses ({} refusals), \
             agreement {:.3}",
            c.threshold, c.responses, c.gcg_refusals, c.agreement
        );
    }
    if let Some(a) = res.probe_agreement_final {
        eprintln!(
            "probe vs gcg on the chosen range's generated responses: {:.3} agreement",
            a
        );
    }
    eprintln!(
        "safety layers: {} ({} runs, {:.1} s)",
        res.range(),
        loc.runs.len(),
        res.seconds
    );
    eprintln!(
        "wrote {}/locate.json, locate.csv, locate.svg, responses/",
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct JudgeArgs {
    /// Responses in the `generate` output format (JSONL with a `response` field)
    #[arg(long)]
    pub responses: PathBuf,
    #[arg(long, default_value = sl_science::judges::DEFAULT_JUDGE)]
    pub judge: String,
    #[arg(long)]
    pub refusal_list: Option<PathBuf>,
}

pub fn run_judge(a: &JudgeArgs) -> Result<()> {
    let judge = judge_from(&a.judge, a.refusal_list.as_ref())?;
    let text = std::fs::read_to_string(&a.responses)
        .with_context(|| format!("cannot read {}", a.responses.display()))?;
    let (mut n, mut refused) = (0usize, 0usize);
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: line {} is not valid JSON",
                a.responses.display(),
                i + 1
            )
        })?;
        let r = v["response"].as_str().ok_or_else(|| {
            anyhow!(
                "{}: line {} has no string field `response`",
                a.responses.display(),
                i + 1
            )
        })?;
        n += 1;
        refused += judge.is_refusal(r) as usize;
    }
    if n == 0 {
        bail!("{}: no responses", a.responses.display());
    }
    println!(
        "{{\"judge\": \"{}\", \"responses\": {n}, \"refusals\": {refused}, \"compliances\": {}}}",
        a.judge,
        n - refused
    );
    Ok(())
}
