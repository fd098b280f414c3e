//! SVG figures for people: labelled axes, a legend, ±std bands, the detected range shaded.

use crate::cosine::Curves;
use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One model's curves to draw; the second model of a comparison is drawn dashed.
pub struct Series<'a> {
    pub label: &'a str,
    pub curves: &'a Curves,
}

const NN: RGBColor = RGBColor(31, 119, 180);
const MM: RGBColor = RGBColor(214, 39, 40);
const NM: RGBColor = RGBColor(44, 160, 44);

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the figure failed: {e:?}")
}

/// x position of entry e: the output of layer e-1 is drawn at layer e-1 (embeddings at -1).
fn x_of(e: usize) -> f64 {
    e as f64 - 1.0
}

fn shade_range(curves: &Curves) -> Option<(f64, f64)> {
    curves
        .initial_range
        .map(|r| (r.first as f64 - 0.5, r.last as f64 + 0.5))
}

type LayerChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Axes over the layers (labelled), the y range given, and the detected range shaded.
fn layer_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    entries: usize,
    (lo, hi): (f64, f64),
    y_desc: &str,
    curves: &Curves,
) -> Result<LayerChart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-1.0..(entries as f64 - 1.5), lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("layer (output of; -1 = embeddings)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    if let Some((a, b)) = shade_range(curves) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, lo), (b, hi)],
                RGBColor(255, 200, 80).mix(0.25).filled(),
            )))
            .map_err(err)?
            .label("initial safety range (rule)")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 18, y + 5)],
                    RGBColor(255, 200, 80).mix(0.5).filled(),
                )
            });
    }
    Ok(chart)
}

/// Mean cosine of N-N, M-M and N-M per layer with ±std bands.
pub fn cosine_svg(series: &[Series<'_>], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let entries = series[0].curves.entries.len();
        let (mut lo, mut hi) = (1.0f64, -1.0f64);
        for s in series {
            for e in &s.curves.entries {
                for (m, sd) in [
                    (e.nn_mean, e.nn_std),
                    (e.mm_mean, e.mm_std),
                    (e.nm_mean, e.nm_std),
                ] {
                    lo = lo.min(m - sd);
                    hi = hi.max(m + sd);
                }
            }
        }
        let (lo, hi) = ((lo - 0.02).max(-1.0), (hi + 0.02).min(1.0));
        let mut chart = layer_chart(
            &root,
            title,
            entries,
            (lo, hi),
            "cosine similarity (mean ± std)",
            series[0].curves,
        )?;
        for (si, s) in series.iter().enumerate() {
            let dashed = si > 0;
            type Pick = fn(&crate::cosine::EntryStats) -> (f64, f64);
            let kinds: [(&str, RGBColor, Pick); 3] = [
                ("N-N", NN, |e| (e.nn_mean, e.nn_std)),
                ("M-M", MM, |e| (e.mm_mean, e.mm_std)),
                ("N-M", NM, |e| (e.nm_mean, e.nm_std)),
            ];
            for (name, color, pick) in kinds {
                let pts: Vec<(f64, f64, f64)> = s
                    .curves
                    .entries
                    .iter()
                    .map(|e| {
                        let (m, sd) = pick(e);
                        (x_of(e.entry), m, sd)
                    })
                    .collect();
                if !dashed {
                    let mut band: Vec<(f64, f64)> =
                        pts.iter().map(|(x, m, sd)| (*x, m + sd)).collect();
                    band.extend(pts.iter().rev().map(|(x, m, sd)| (*x, m - sd)));
                    chart
                        .draw_series(std::iter::once(Polygon::new(
                            band,
                            color.mix(0.12).filled(),
                        )))
                        .map_err(err)?;
                }
                let line: Vec<(f64, f64)> = pts.iter().map(|(x, m, _)| (*x, *m)).collect();
                let label = format!("{name} {}", s.label);
                let style = ShapeStyle {
                    color: color.to_rgba(),
                    filled: false,
                    stroke_width: 2,
                };
                if dashed {
                    chart
                        .draw_series(DashedLineSeries::new(line, 6, 4, style))
                        .map_err(err)?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.mix(0.6))
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(line, style))
                        .map_err(err)?
                        .label(label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The N-M vs N-N angle gap per layer: the code's and the paper's definitions.
pub fn angle_gap_svg(series: &[Series<'_>], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let entries = series[0].curves.entries.len();
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for s in series {
            for e in &s.curves.entries {
                lo = lo.min(e.gap_code_deg).min(e.gap_paper_deg);
                hi = hi.max(e.gap_code_deg).max(e.gap_paper_deg);
            }
        }
        let pad = (hi - lo) * 0.05;
        let mut chart = layer_chart(
            &root,
            title,
            entries,
            (lo - pad, hi + pad),
            "angle gap N-M vs N-N (degrees)",
            series[0].curves,
        )?;
        let colors = [RGBColor(106, 61, 154), RGBColor(255, 127, 0)];
        for (si, s) in series.iter().enumerate() {
            let color = colors[si % 2];
            let code: Vec<(f64, f64)> = s
                .curves
                .entries
                .iter()
                .map(|e| (x_of(e.entry), e.gap_code_deg))
                .collect();
            let paper: Vec<(f64, f64)> = s
                .curves
                .entries
                .iter()
                .map(|e| (x_of(e.entry), e.gap_paper_deg))
                .collect();
            let solid = ShapeStyle {
                color: color.to_rgba(),
                filled: false,
                stroke_width: 2,
            };
            chart
                .draw_series(LineSeries::new(code, solid))
                .map_err(err)?
                .label(format!(
                    "{}: deg(acos(mean N-M)) - deg(acos(mean N-N)) (official code)",
                    s.label
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(DashedLineSeries::new(paper, 5, 4, solid))
                .map_err(err)?
                .label(format!(
                    "{}: mean angle(n,m) - mean angle(n,n') (paper formula)",
                    s.label
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 6, y), (x + 12, y)], color.mix(0.6))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
