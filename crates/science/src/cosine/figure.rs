//! SVG figures for people: labelled axes, a legend, ±std bands, the detected range shaded.

use crate::cosine::Curves;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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
            .map_err(err)?;
    }
    Ok(chart)
}

/// How a legend entry is drawn.
enum Mark {
    Line,
    Dashed,
    Band,
}

struct LegendItem {
    label: String,
    color: RGBColor,
    mark: Mark,
}

/// The range's legend entry, when the chart shades one.
fn range_item(curves: &Curves) -> Option<LegendItem> {
    shade_range(curves).map(|_| LegendItem {
        label: "initial safety range (rule)".into(),
        color: RGBColor(255, 200, 80),
        mark: Mark::Band,
    })
}

/// Pixel height of a legend of `n` entries in `columns` columns.
fn legend_height(n: usize, columns: usize) -> u32 {
    (n.div_ceil(columns) * 20 + 14) as u32
}

/// The legend in its own band under the plot, so that it never covers a curve.
fn legend_below(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    items: &[LegendItem],
    columns: usize,
) -> Result<()> {
    let (w, _) = area.dim_in_pixel();
    let col_w = (w as i32 - 40) / columns as i32;
    let style =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, item) in items.iter().enumerate() {
        let (x, y) = (
            20 + (i % columns) as i32 * col_w,
            10 + (i / columns) as i32 * 20,
        );
        match item.mark {
            Mark::Line => area.draw(&PathElement::new(
                vec![(x, y), (x + 22, y)],
                item.color.stroke_width(2),
            )),
            Mark::Dashed => area
                .draw(&PathElement::new(
                    vec![(x, y), (x + 8, y)],
                    item.color.mix(0.6).stroke_width(2),
                ))
                .and_then(|_| {
                    area.draw(&PathElement::new(
                        vec![(x + 14, y), (x + 22, y)],
                        item.color.mix(0.6).stroke_width(2),
                    ))
                }),
            Mark::Band => area.draw(&Rectangle::new(
                [(x, y - 6), (x + 22, y + 6)],
                item.color.mix(0.5).filled(),
            )),
        }
        .map_err(err)?;
        area.draw(&Text::new(item.label.clone(), (x + 28, y), style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

/// Mean cosine of N-N, M-M and N-M per layer with ±std bands.
pub fn cosine_svg(series: &[Series<'_>], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let n_items = 3 * series.len() + usize::from(range_item(series[0].curves).is_some());
        let legend_h = legend_height(n_items, 3);
        let root = SVGBackend::with_string(&mut svg, (900, 500 + legend_h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (root, legend_area) = root.split_vertically(500);
        let mut items: Vec<LegendItem> = range_item(series[0].curves).into_iter().collect();
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
                        .map_err(err)?;
                } else {
                    chart
                        .draw_series(LineSeries::new(line, style))
                        .map_err(err)?;
                }
                items.push(LegendItem {
                    label,
                    color,
                    mark: if dashed { Mark::Dashed } else { Mark::Line },
                });
            }
        }
        legend_below(&legend_area, &items, 3)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The N-M vs N-N angle gap per layer: the code's and the paper's definitions.
pub fn angle_gap_svg(series: &[Series<'_>], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let n_items = 2 * series.len() + usize::from(range_item(series[0].curves).is_some());
        let legend_h = legend_height(n_items, 1);
        let root = SVGBackend::with_string(&mut svg, (900, 460 + legend_h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (root, legend_area) = root.split_vertically(460);
        let mut items: Vec<LegendItem> = range_item(series[0].curves).into_iter().collect();
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
                .map_err(err)?;
            chart
                .draw_series(DashedLineSeries::new(paper, 5, 4, solid))
                .map_err(err)?;
            items.push(LegendItem {
                label: format!(
                    "{}: deg(acos(mean N-M)) - deg(acos(mean N-N)) (official code)",
                    s.label
                ),
                color,
                mark: Mark::Line,
            });
            items.push(LegendItem {
                label: format!(
                    "{}: mean angle(n,m) - mean angle(n,n') (paper formula)",
                    s.label
                ),
                color,
                mark: Mark::Dashed,
            });
        }
        legend_below(&legend_area, &items, 1)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
