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
        // Counts are integers: an integer axis, so ticks never read 40.0 or repeat.
        let top = (max as f64 * 1.15).ceil() as u32 + 1;
        for (panel, s) in panels.iter().zip([&res.upper, &res.lower]) {
            let n = s.tried.len();
            let title = format!("{} bound sweep (alpha {})", s.kind, s.alpha);
            // One segment per range tried, each labelled under its bar.
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(45)
                .y_label_area_size(50)
                // A segmented 0..k has k + 1 segments: one per range tried.
                .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0u32..top)
                .map_err(err)?;
            let labels: Vec<String> = s
                .tried
                .iter()
                .map(|(r, _)| format!("[{},{}]", r.first, r.last))
                .collect();
            chart
                .configure_mesh()
                .x_labels(n + 1)
                .x_label_formatter(&|x| match x {
                    SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .y_label_formatter(&|y| format!("{y}"))
                .x_desc("scaled layer range")
                .y_desc("refusals on the over-rejection set")
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(err)?;
            for (best, color) in [
                (false, RGBColor(31, 119, 180)),
                (true, RGBColor(214, 39, 40)),
            ] {
                chart
                    .draw_series(
                        Histogram::vertical(&chart)
                            .style(color.filled())
                            .margin(8)
                            .data(s.tried.iter().enumerate().filter_map(|(i, (r, c))| {
                                ((*r == s.best) == best).then_some((i, *c as u32))
                            })),
                    )
                    .map_err(err)?;
            }
            chart
                .draw_series(LineSeries::new(
                    vec![
                        (SegmentValue::Exact(0), res.baseline as u32),
                        (SegmentValue::Last, res.baseline as u32),
                    ],
                    BLACK.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("unscaled baseline ({})", res.baseline))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every range tried gets a bar and its own label, counts are drawn as integers, and the
    /// kept range's bar is the highlighted one.
    #[test]
    fn sweeps_figure_labels_every_range_and_counts_as_integers() {
        let r = |first, last| LayerRange { first, last };
        let sweep = |kind: &str, tried: Vec<(LayerRange, usize)>, best| Sweep {
            kind: kind.into(),
            alpha: 1.2,
            tried,
            best,
        };
        let upper: Vec<_> = (3..12).map(|j| (r(2, j), 30 + j)).collect();
        let lower: Vec<_> = (0..7).map(|i| (r(i, 9), 35 + i)).collect();
        let res = LocateResult {
            alpha: 1.2,
            alpha_steps: vec![],
            baseline: 25,
            upper: sweep("upper", upper.clone(), r(2, 11)),
            lower: sweep("lower", lower.clone(), r(6, 9)),
            seconds: 1.0,
            probe_agreement_final: None,
        };
        let svg = sweeps_svg(&res).unwrap();
        // The texts drawn, trimmed.
        let texts: Vec<&str> = svg
            .split("</text>")
            .filter_map(|chunk| chunk.rsplit_once('>').map(|(_, t)| t.trim()))
            .collect();
        for (range, _) in upper.iter().chain(&lower) {
            let label = format!("[{},{}]", range.first, range.last);
            assert!(
                texts.contains(&label.as_str()),
                "{label} missing from {texts:?}"
            );
        }
        let numbers: Vec<&&str> = texts.iter().filter(|t| t.parse::<f64>().is_ok()).collect();
        assert!(numbers.len() >= 4, "{texts:?}");
        assert!(
            numbers.iter().all(|t| t.parse::<u32>().is_ok()),
            "a count printed as a float: {numbers:?}"
        );
        // One filled bar per range (blue, and the kept one red in each panel).
        let red = svg.matches("fill=\"#D62728\"").count();
        let blue = svg.matches("fill=\"#1F77B4\"").count();
        assert_eq!(
            (red, blue),
            (2, upper.len() + lower.len() - 2),
            "{red} red, {blue} blue"
        );
    }
}
