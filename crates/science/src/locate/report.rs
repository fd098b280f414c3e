//! The localisation procedure end to end and its outputs: locate.json, locate.csv (the layout of
//! the paper's Table 1), locate.svg, and every run's judged responses.

use crate::locate::file::{
    LocateFile, LocateJudge, LocateMeta, ProbeJudge, RunInfo, SCHEMA_VERSION,
};
use crate::locate::{AlphaMode, AlphaStep, Locator, Sweep};
use anyhow::Result;
use plotters::prelude::*;
use serde_json::json;
use sl_engine::io::atomic::write_atomic;
use sl_engine::LayerRange;
use std::path::Path;

pub struct LocateResult {
    pub alpha: f64,
    pub alpha_steps: Vec<AlphaStep>,
    pub baseline: usize,
    pub upper: Sweep,
    pub lower: Sweep,
    pub seconds: f64,
    /// With the probe judge: agreement with the text judge on the chosen range's responses.
    pub probe_agreement_final: Option<f64>,
}

impl LocateResult {
    pub fn range(&self) -> LayerRange {
        self.lower.best
    }
}

/// Baseline, alpha (fixed or A.3.4), upper-bound sweep from `initial`, then lower-bound sweep.
pub fn run(
    loc: &mut Locator<'_>,
    initial: LayerRange,
    alpha: AlphaMode,
    progress: &mut dyn FnMut(usize),
) -> Result<LocateResult> {
    let t0 = std::time::Instant::now();
    if loc.probe_enabled() {
        let a = match alpha {
            AlphaMode::Fixed(a) => a,
            AlphaMode::Auto { .. } => 1.2,
        };
        loc.calibrate_probe(initial, a, progress)?;
    }
    let baseline = loc.count(None, 1.0, progress)?;
    let (alpha, alpha_steps) = match alpha {
        AlphaMode::Fixed(a) => (a, vec![]),
        AlphaMode::Auto {
            std_threshold_per_721,
        } => loc.auto_alpha(initial, std_threshold_per_721, progress)?,
    };
    let upper = loc.sweep(initial, true, alpha, progress)?;
    let lower = loc.sweep(
        LayerRange {
            first: initial.first,
            last: upper.best.last,
        },
        false,
        alpha,
        progress,
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    let probe_agreement_final = loc.probe_agreement(Some(lower.best), alpha, progress)?;
    Ok(LocateResult {
        alpha,
        alpha_steps,
        baseline,
        upper,
        lower,
        seconds,
        probe_agreement_final,
    })
}

fn range_name(r: Option<LayerRange>) -> String {
    r.map(|r| r.to_string())
        .unwrap_or_else(|| "baseline".into())
}

/// The contents of locate.json for a finished run.
pub fn locate_file(
    loc: &Locator<'_>,
    res: &LocateResult,
    initial: LayerRange,
    meta: LocateMeta,
) -> LocateFile {
    let runs = loc
        .runs
        .values()
        .map(|r| RunInfo {
            range: range_name(r.range),
            alpha: r.alpha,
            refusals: r.refusals,
            seconds: r.seconds,
            responses: format!("responses/{}@{}.jsonl", range_name(r.range), r.alpha),
        })
        .collect();
    let judge = if loc.probe_enabled() {
        LocateJudge::Probe(ProbeJudge {
            kind: "probe".into(),
            calibrated_against: loc.judge().clone(),
            calibration: loc.calibration.clone(),
            first_token_openings: crate::judges::probe::REFUSAL_OPENINGS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            agreement_on_chosen_range: res.probe_agreement_final,
        })
    } else {
        LocateJudge::Text(loc.judge().clone())
    };
    let objective = if res.alpha > 1.0 {
        "maximise refusals (alpha > 1)"
    } else {
        "minimise refusals (alpha < 1)"
    };
    LocateFile {
        schema_version: SCHEMA_VERSION,
        meta,
        judge,
        queries: loc.num_prompts(),
        initial_range: initial,
        alpha: res.alpha,
        alpha_steps: res.alpha_steps.clone(),
        objective: objective.into(),
        baseline: res.baseline,
        upper_sweep: res.upper.clone(),
        lower_sweep: res.lower.clone(),
        range: res.range(),
        runs,
        seconds: res.seconds,
    }
}

/// Writes locate.json, locate.csv, locate.svg and `responses/<range>@<alpha>.jsonl` into `dir`.
pub fn write(
    dir: &Path,
    loc: &Locator<'_>,
    res: &LocateResult,
    initial: LayerRange,
    meta: LocateMeta,
) -> Result<()> {
    std::fs::create_dir_all(dir.join("responses"))?;
    locate_file(loc, res, initial, meta).write(&dir.join("locate.json"))?;

    let mut csv = String::from("sweep,alpha,baseline,range,first,last,refusals,best\n");
    for s in [&res.upper, &res.lower] {
        for (r, c) in &s.tried {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                s.kind,
                s.alpha,
                res.baseline,
                r,
                r.first,
                r.last,
                c,
                if *r == s.best { "*" } else { "" }
            ));
        }
    }
    write_atomic(&dir.join("locate.csv"), csv.as_bytes())?;
    write_atomic(&dir.join("locate.svg"), sweeps_svg(res)?.as_bytes())?;

    for r in loc.runs.values() {
        let mut lines = String::new();
        for j in &r.responses {
            lines.push_str(&serde_json::to_string(&json!({
                "prompt": j.prompt, "response": j.response, "output_ids": j.output_ids,
                "refusal": j.refusal, "stop": j.stop, "probe_score": j.probe_score,
            }))?);
            lines.push('\n');
        }
        write_atomic(
            &dir.join("responses")
                .join(format!("{}@{}.jsonl", range_name(r.range), r.alpha)),
            lines.as_bytes(),
        )?;
    }
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing locate.svg failed: {e:?}")
}

/// Both sweeps as bars, the baseline as a line, the kept range of each sweep highlighted.
pub fn sweeps_svg(res: &LocateResult) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let panels = root.split_evenly((1, 2));
        let max = res
            .upper
            .tried
            .iter()
            .chain(&res.lower.tried)
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(0)
            .max(res.baseline);
        for (panel, s) in panels.iter().zip([&res.upper, &res.lower]) {
            let n = s.tried.len();
            let title = format!("{} bound sweep (alpha {})", s.kind, s.alpha);
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(45)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..n as f64, 0f64..(max as f64 * 1.15 + 1.0))
                .map_err(err)?;
            let labels: Vec<String> = s
                .tried
                .iter()
                .map(|(r, _)| format!("[{},{}]", r.first, r.last))
                .collect();
            chart
                .configure_mesh()
                .x_labels(n)
                .x_label_formatter(&|x| labels.get(x.floor() as usize).cloned().unwrap_or_default())
                .x_desc("scaled layer range")
                .y_desc("refusals on the over-rejection set")
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(err)?;
            chart
                .draw_series(s.tried.iter().enumerate().map(|(i, (r, c))| {
                    let color = if *r == s.best {
                        RGBColor(214, 39, 40)
                    } else {
                        RGBColor(31, 119, 180)
                    };
                    Rectangle::new(
                        [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *c as f64)],
                        color.filled(),
                    )
                }))
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, res.baseline as f64), (n as f64, res.baseline as f64)],
                    BLACK.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("unscaled baseline ({})", res.baseline))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}
