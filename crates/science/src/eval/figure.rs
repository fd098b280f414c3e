//! eval.svg: per model, one bar per judged set (R_h, then the refusal rates of D_o and XSTest)
//! in percent, each with its 95% Wilson interval as an error bar.

use crate::eval::report::EvalReport;
use crate::eval::SetKind;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing eval.svg failed: {e:?}")
}

fn colour(k: SetKind) -> RGBColor {
    match k {
        SetKind::Harmful => RGBColor(214, 39, 40),
        SetKind::OverRejection => RGBColor(31, 119, 180),
        SetKind::XstestSafe => RGBColor(44, 160, 44),
        SetKind::XstestUnsafe => RGBColor(148, 103, 189),
    }
}

pub fn bars_svg(report: &EvalReport) -> Result<String> {
    let kinds: Vec<SetKind> = report.sets.iter().map(|s| s.kind).collect();
    // (model index, set index, rate, low, high) in percent, for the models that ran.
    let mut bars = Vec::new();
    for (mi, row) in report
        .models
        .iter()
        .enumerate()
        .filter(|(_, r)| r.error.is_none())
    {
        for (k, s) in report.summaries(row)?.sets {
            let si = kinds.iter().position(|x| *x == k).unwrap_or(0);
            bars.push((
                mi,
                si,
                100.0 * s.rate.rate,
                100.0 * s.rate.ci95_low,
                100.0 * s.rate.ci95_high,
            ));
        }
    }
    let n_models = report.models.len().max(1);
    // At most the report's page width (1100 px, less margins): wider figures were scaled down
    // until their text was unreadable. Bars share the width instead.
    let width = (220 + 90 * n_models * kinds.len().max(1)).clamp(640, 1040) as u32;
    let labels: Vec<String> = report
        .models
        .iter()
        .map(|r| {
            if r.error.is_some() {
                format!("{} (failed)", r.label)
            } else {
                r.label.clone()
            }
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Harmful rate and over-rejection per model (95% Wilson intervals)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..n_models as f64, 0f64..115f64)
            .map_err(err)?;
        // Model names are drawn centred under their groups below, not as mesh labels (plotters
        // places those at round numbers, not at the groups).
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|_| String::new())
            .y_labels(12)
            .y_label_formatter(&|y| {
                if *y <= 100.0 {
                    format!("{y:.0}")
                } else {
                    String::new()
                }
            })
            .x_desc("model")
            .y_desc("% of prompts")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        let slot = 0.8 / kinds.len().max(1) as f64;
        let x0 = |mi: usize, si: usize| mi as f64 + 0.1 + si as f64 * slot;
        for (si, k) in kinds.iter().enumerate() {
            let c = colour(*k);
            let mine: Vec<_> = bars.iter().filter(|b| b.1 == si).cloned().collect();
            chart
                .draw_series(mine.iter().map(|&(mi, _, r, _, _)| {
                    Rectangle::new(
                        [(x0(mi, si) + 0.1 * slot, 0.0), (x0(mi, si) + 0.9 * slot, r)],
                        c.filled(),
                    )
                }))
                .map_err(err)?
                .label(k.title())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            for &(mi, _, _, lo, hi) in &mine {
                let xm = x0(mi, si) + 0.5 * slot;
                let cap = 0.15 * slot;
                for seg in [
                    vec![(xm, lo), (xm, hi)],
                    vec![(xm - cap, lo), (xm + cap, lo)],
                    vec![(xm - cap, hi), (xm + cap, hi)],
                ] {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            seg,
                            BLACK.stroke_width(1),
                        )))
                        .map_err(err)?;
                }
            }
        }
        let name_style =
            TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (mi, label) in labels.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(mi as f64 + 0.5, 0.0));
            root.draw(&Text::new(label.clone(), (px, py + 8), name_style.clone()))
                .map_err(err)?;
        }
        let value_style = TextStyle::from(("sans-serif", 11).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        for &(mi, si, r, _, hi) in &bars {
            let (px, py) = chart.backend_coord(&(x0(mi, si) + 0.5 * slot, hi));
            root.draw(&Text::new(
                format!("{r:.1}"),
                (px, py - 2),
                value_style.clone(),
            ))
            .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
