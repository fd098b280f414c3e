//! The demo's report: `results.json` (every number the report shows, with provenance) and one
//! self-contained `report.html` (inline CSS and SVG, no network) that states, with numbers,
//! whether each of the paper's three findings reproduced on the model organism.

mod judges;
pub mod results;
mod sppft;

use crate::cosine::file::{CosineFile, LargestGap};
use crate::demo::Provenance;
use crate::eval::file::{EvalFile, EvalModel};
use crate::eval::SetSummary;
use crate::locate::file::LocateFile;
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use results::{Claim, CosineResults, FinetuneBrief, LocateResults, ResultsFile, SCHEMA_VERSION};
use serde_json::{json, Value};
use sl_engine::io::atomic::write_atomic;
use std::collections::BTreeMap;
use std::path::Path;

/// A JSON file, with errors that name it.
pub fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", p.display()))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG file's markup for inlining (without the XML declaration).
fn inline_svg(p: &Path) -> Result<String> {
    let s = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read figure {}", p.display()))?;
    let start = s
        .find("<svg")
        .ok_or_else(|| anyhow!("{} is not an SVG", p.display()))?;
    Ok(s[start..].to_string())
}

pub(crate) fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}%", 100.0 * x))
        .unwrap_or_else(|| "—".into())
}

/// `rate [low, high]` of one set of one eval row.
fn rate_ci(s: Option<&SetSummary>) -> String {
    let Some(s) = s else {
        return "—".into();
    };
    let r = &s.rate;
    format!(
        "{} <span class=ci>[{}, {}]</span> <span class=n>{}/{}</span>",
        pct(Some(r.rate)),
        pct(Some(r.ci95_low)),
        pct(Some(r.ci95_high)),
        r.count,
        r.n
    )
}

/// Training loss per step of every fine-tuning run (and the alignment run).
fn loss_svg(runs: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (760, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let max_x = runs
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.0))
            .fold(1.0, f64::max);
        let (lo, hi) = runs
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.1))
            .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        let (lo, hi) = if lo <= hi {
            (lo.min(hi - 0.1) * 0.95, hi * 1.05)
        } else {
            (0.0, 1.0)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption("Training loss per optimizer step", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..max_x, lo..hi)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("mean token loss")
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        for (i, (name, pts)) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().cloned(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow!("{e:?}"))?;
    }
    Ok(buf)
}

/// (step, loss) of every optimizer step in a run's train_log.jsonl (the held-out loss lines
/// have no `loss`; a null loss is a non-finite one, not drawn).
fn train_curve(dir: &Path) -> Result<Vec<(f64, f64)>> {
    #[derive(serde::Deserialize)]
    struct Line {
        step: u64,
        #[serde(default)]
        loss: Option<f64>,
    }
    let p = dir.join("train_log.jsonl");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        let line: Line =
            serde_json::from_str(l).map_err(|e| anyhow!("{}: line {}: {e}", p.display(), i + 1))?;
        if let Some(loss) = line.loss {
            out.push((line.step as f64, loss));
        }
    }
    Ok(out)
}

/// The layer a largest gap is at, as the evidence shows it.
fn gap_layer(g: Option<&LargestGap>) -> String {
    g.map_or("null".into(), |g| g.layer.to_string())
}

/// The verdict on each claim, from the measured numbers.
fn claims(
    cos: &CosineFile,
    loc: &LocateFile,
    eval: &EvalFile,
    eval_dir: &Path,
    prov: &Provenance,
) -> Result<Vec<Claim>> {
    let control_desc = if prov.control_narrower {
        format!(
            "a control freeze of the narrower range {} (no equally wide range fits beside the \
             located one)",
            prov.control_range
        )
    } else {
        format!(
            "a control freeze of the equally wide range {}",
            prov.control_range
        )
    };
    let initial = cos.main.initial_range.map(|r| sl_engine::LayerRange {
        first: r.first,
        last: r.last,
    });
    // Where the aligned model's gap parts from the base model's: beside the paper's reading, for
    // the positive control.
    let gaps = |r: &crate::cosine::file::CosineRun| -> Vec<f64> {
        r.entries.iter().map(|e| e.gap_code_deg).collect()
    };
    let parting = cos
        .compare
        .as_ref()
        .and_then(|c| crate::cosine::range_rule::parting_layer(&gaps(&cos.main), &gaps(c)));
    let mut out: Vec<Claim> = sppft::planted_claim(prov, loc, initial, parting, eval, eval_dir)?
        .into_iter()
        .collect();
    // 1. Existence: N-M similarity separates from N-N in the middle layers of the aligned model.
    let g = cos.main.largest_gap.as_ref();
    let base_g = cos.compare.as_ref().and_then(|c| c.largest_gap.as_ref());
    // No largest gap means no entries, hence no gap.
    let gap = g.map_or(0.0, |g| g.gap_code_deg);
    let base_gap = base_g.map_or(f64::NAN, |g| g.gap_code_deg);
    let range = cos.main.initial_range;
    let holds = gap >= 1.0 && range.is_some();
    out.push(Claim {
        claim: "1. Safety layers exist: in the aligned model the N-M cosine curve separates from \
                N-N in the middle layers"
            .into(),
        verdict: if holds {
            if gap > base_gap + 0.5 {
                "reproduced"
            } else {
                "partly: a gap opens in the middle layers, but it is not wider than the base \
                 model's (by more than 0.5°), so the safety SFT did not create it here"
            }
        } else {
            "not reproduced"
        }
        .into(),
        evidence: format!(
            "largest angle gap {:.2}° at the output of layer {} (aligned) vs {:.2}° at layer {} \
             (base); initial range from the rule: {}; the two models' gaps first differ by 1° or \
             more at layer {}",
            gap,
            gap_layer(g),
            base_gap,
            gap_layer(base_g),
            match range {
                None => "none (gap < 1°)".to_string(),
                Some(r) => format!("[{}, {}]", r.first, r.last),
            },
            match (&cos.compare, parting) {
                (None, _) => "- (no base model compared)".to_string(),
                (Some(_), None) => "- (never)".to_string(),
                (Some(_), Some(l)) => l.to_string(),
            }
        ),
        control_protects_less: None,
        paired: vec![],
        arms: vec![],
    });
    // 2. Localisation: scaling the range by alpha moves over-rejection the most.
    let (baseline, alpha) = (loc.baseline, loc.alpha);
    let best = loc
        .lower_sweep
        .tried
        .iter()
        .find(|(r, _)| *r == loc.range)
        .map(|(_, c)| *c);
    let moved = best.is_some_and(|b| {
        if alpha > 1.0 {
            b > baseline
        } else {
            b < baseline
        }
    });
    // A change within about two binomial standard deviations of the baseline count is noise.
    let clear = best.is_some_and(|b| {
        (b as f64 - baseline as f64).abs() >= 2.0 * (baseline.max(1) as f64).sqrt() + 1.0
    });
    out.push(Claim {
        claim: "2. The safety layers can be located: scaling their weights (alpha) changes \
                over-rejection most within a precise range"
            .into(),
        verdict: match (moved, clear) {
            (true, true) => "reproduced",
            (true, false) => {
                "weak: the chosen range moves the count in the expected direction, but by less \
                 than 2 sqrt(baseline) + 1 queries"
            }
            _ => "not reproduced: no range moved the refusal count away from the baseline",
        }
        .into(),
        evidence: format!(
            "alpha {alpha}: baseline {baseline} refusals of {} queries; chosen range [{}, {}] \
             gives {}",
            loc.queries,
            loc.range.first,
            loc.range.last,
            best.map(|b| b.to_string()).unwrap_or("?".into())
        ),
        control_protects_less: None,
        paired: vec![],
        arms: vec![],
    });
    // 3. SPPFT: freezing them keeps R_h low where full fine-tuning raises it; control freezes
    // protect less; utility stays close.
    out.extend(sppft::sppft_claims(eval, eval_dir, prov, &control_desc)?);
    Ok(out)
}

/// What the run's sizes can and cannot show: the smallest SPPFT-vs-full difference its pooled
/// paired test detects with 80% power, and the noise band of the localisation counts.
fn limits(prov: &Provenance, loc: &LocateFile, claims: &[Claim]) -> String {
    let mut p = format!(
        "<h2>What this run can and cannot show</h2><p>Profile <b>{}</b>: {} seed(s) per \
         fine-tuning arm. ",
        esc(&prov.profile.name),
        prov.profile.ft_seeds
    );
    let vs_full = claims
        .iter()
        .find_map(|c| c.headline("full").filter(|p| p.arm == "sppft"));
    if let Some(r) = vs_full {
        let n = r.counts.n;
        let discordant = (r.counts.only_a + r.counts.only_b) as f64 / n.max(1) as f64;
        let mdd = crate::paired::detectable_difference(n, discordant, 0.8);
        if r.counts.only_a + r.counts.only_b == 0 {
            p += &format!(
                "SPPFT and full fine-tuning gave the same verdict on every one of the {n} paired \
                 harmful prompts: no prompt was discordant, so the paired test has nothing to \
                 weigh and its power cannot be estimated from this run. "
            );
        } else {
            p += &format!(
            "SPPFT against full fine-tuning is compared on {n} paired harmful prompts{}; at the \
             share of discordant prompts seen here ({:.0}%) the exact McNemar test detects {} \
             with 80% power. Smaller differences cannot be told from noise at this size. ",
            if r.pooled_seeds > 0 {
                format!(" ({} seeds pooled)", r.pooled_seeds)
            } else {
                String::new()
            },
            100.0 * discordant,
            match mdd {
                Some(d) => format!("a difference of {:.1} points or more", 100.0 * d),
                None => "no difference of any size".into(),
            }
        );
        }
    }
    let band = 2.0 * (loc.baseline.max(1) as f64).sqrt() + 1.0;
    p += &format!(
        "Localisation judges {} over-rejection queries; a range whose count stays within \
         {band:.0} of the baseline ({}) is read as noise.</p>\n",
        loc.queries, loc.baseline
    );
    p
}

// Lines ending in `\` continue without a line break (Rust string continuation); the others end
// in a real newline of the stylesheet.
const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;\
    padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}\
    table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
    th{background:#f4f4f4}
.ci{color:#666;font-size:.85em}.n{color:#999;font-size:.8em}\
    .claim{border-left:5px solid #888;padding:.4em .8em;margin:.8em 0;background:#fafafa}
.ok{border-color:#2a9d48}.part{border-color:#e0a000}.no{border-color:#c0392b}figure{margin:1em 0}\
    figure svg{max-width:100%;height:auto}
code{font-size:.85em;word-break:break-all}";

/// Writes results.json and report.html into `dir` from the stage outputs there.
pub fn write(dir: &Path, provenance: &Provenance) -> Result<()> {
    let cos = CosineFile::read(&dir.join("cosine/cosine.json"))?;
    let loc = LocateFile::read(&dir.join("locate/locate.json"))?;
    let eval = EvalFile::read(&dir.join("eval/eval.json"))?;
    let align = read_json(&dir.join("aligned/align.json"))?;
    let runs = &provenance.finetune_runs;
    let mut finetunes = BTreeMap::new();
    let mut curves = vec![("align".to_string(), train_curve(&dir.join("aligned"))?)];
    for r in runs {
        let n = r.name.as_str();
        let ft = crate::finetune::summary::read(&dir.join(n).join("finetune.json"))?;
        finetunes.insert(n.to_string(), FinetuneBrief::from(&ft));
        curves.push((n.to_string(), train_curve(&dir.join(n))?));
    }
    let verdicts = claims(&cos, &loc, &eval, &dir.join("eval"), provenance)?;
    let results = ResultsFile {
        schema_version: SCHEMA_VERSION,
        claims: verdicts.clone(),
        cosine: CosineResults {
            largest_gap: cos.main.largest_gap.clone(),
            initial_range: cos.main.initial_range,
            base_largest_gap: cos.compare.as_ref().and_then(|c| c.largest_gap.clone()),
        },
        locate: LocateResults {
            alpha: loc.alpha,
            baseline: loc.baseline,
            queries: loc.queries,
            range: loc.range,
            upper_sweep: loc.upper_sweep.clone(),
            lower_sweep: loc.lower_sweep.clone(),
        },
        align: json!({"data": align["data"], "final_loss": align["training"]["final_loss"],
                      "seconds": align["seconds"]}),
        finetune: finetunes,
        provenance: provenance.clone(),
        eval,
    };
    results.write(&dir.join("results.json"))?;
    let eval = &results.eval;

    let mut h = String::new();
    h.push_str(&format!(
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>\
         <title>safety-layers demo report</title><style>{CSS}</style></head><body>\n"
    ));
    h.push_str(&format!(
        "<h1>Safety layers on a model organism — {} profile</h1><p>Base model <b>{}</b>, aligned \
         here by safety SFT, then studied as the paper (Li et al., ICLR 2025) studies \
         Llama-3-8B-Instruct. Every number below comes from the stage outputs in this directory; \
         <code>results.json</code> holds them all.</p>\n",
        esc(&provenance.profile.name),
        esc(&provenance.base_model.name)
    ));
    h.push_str("<h2>The paper's findings, as measured here</h2>\n");
    for c in &verdicts {
        let v = c.verdict.as_str();
        let class = if v.starts_with("reproduced") {
            "ok"
        } else if v.starts_with("not") {
            "no"
        } else {
            "part"
        };
        h.push_str(&format!(
            "<div class='claim {class}'><b>{}</b><br>Verdict: <b>{}</b><br>{}</div>\n",
            esc(&c.claim),
            esc(v),
            esc(&c.evidence)
        ));
    }
    h.push_str(&limits(provenance, &loc, &verdicts));
    h.push_str(
        "<h2>Results (the layout of the paper's Table 2)</h2><table><tr><th>model</th>\
         <th>R_h (AdvBench answered)</th><th>D_o refused</th><th>XSTest safe refused</th>\
         <th>XSTest unsafe refused</th><th>Rouge-L F1</th><th>perplexity</th></tr>\n",
    );
    for m in &eval.models {
        let m = match m {
            EvalModel::Failed(f) => {
                h.push_str(&format!(
                    "<tr><td>{}</td><td colspan=6>failed: {}</td></tr>\n",
                    esc(&f.label),
                    esc(&f.error)
                ));
                continue;
            }
            EvalModel::Ok(m) => m,
        };
        let u = m.utility.as_ref();
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             </tr>\n",
            esc(&m.label),
            rate_ci(m.harmful.as_ref()),
            rate_ci(m.over_rejection.as_ref()),
            rate_ci(m.xstest_safe.as_ref()),
            rate_ci(m.xstest_unsafe.as_ref()),
            u.map(|u| format!("{:.3}", u.rouge_l_f1))
                .unwrap_or("—".into()),
            u.and_then(|u| u.perplexity)
                .map(|x| format!("{x:.2}"))
                .unwrap_or("—".into())
        ));
    }
    h.push_str(
        "</table><p class=n>Rates with 95% Wilson intervals and counts; judge: see eval/eval.json. \
         Responses of every model to every set are in eval/responses/.</p>\n",
    );
    h.push_str(&judges::section(eval, &dir.join("eval"))?);
    h.push_str("<h2>Figures</h2>\n");
    for (file, caption) in [
        (
            "cosine/cosine.svg",
            "Mean last-token cosine similarity per layer (N-N, M-M, N-M, ±std): aligned model \
             solid, base dashed",
        ),
        (
            "cosine/angle_gap.svg",
            "Angle gap between N-M and N-N pairs per layer",
        ),
        (
            "locate/locate.svg",
            "Localisation: over-rejection refusals for each range of both sweeps, with the \
             unscaled baseline",
        ),
        (
            "eval/eval.svg",
            "Harmful rate and over-rejection per model, with 95% intervals",
        ),
    ] {
        h.push_str(&format!(
            "<figure>{}<figcaption>{}</figcaption></figure>\n",
            inline_svg(&dir.join(file))?,
            esc(caption)
        ));
    }
    h.push_str(&format!(
        "<figure>{}<figcaption>Training loss of the alignment run and of every fine-tuning run\
         </figcaption></figure>\n",
        loss_svg(&curves)?
    ));

    h.push_str("<h2>Alignment of the organism</h2>\n");
    let ad = &align["data"];
    h.push_str(&format!(
        "<p>{} harmful prompts (sources: {}) paired with refusals, {} benign Alpaca prompts \
         paired with the base model's own greedy answers; prompts overlapping an evaluation set \
         removed on normalised text (overlap after selection: {}). Final training loss {}.</p>\n",
        ad["harmful"]["chosen"],
        esc(&ad["harmful"]["by_source"].to_string()),
        ad["benign"]["kept"],
        ad["overlap_after_selection"],
        align["training"]["final_loss"]
            .as_f64()
            .map(|x| format!("{x:.3}"))
            .unwrap_or("—".into())
    ));
    h.push_str(
        "<h2>Provenance</h2><table><tr><th>stage</th><th>command</th><th>seconds</th>\
         <th>cached</th></tr>\n",
    );
    for s in &provenance.stages {
        h.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td>{:.1}</td><td>{}</td></tr>\n",
            esc(&s.name),
            esc(&s.command),
            s.seconds,
            s.cached
        ));
    }
    h.push_str("</table><table>\n");
    h.push_str(&format!(
        "<tr><th>tool</th><td>{}</td></tr>\n",
        esc(&provenance.tool)
    ));
    if let Some(by) = &provenance.report_rebuilt_by {
        h.push_str(&format!(
            "<tr><th>report rebuilt by</th><td>{} (from the stages above, run by the tool \
             above; nothing was run again)</td></tr>\n",
            esc(by)
        ));
    }
    h.push_str(&format!(
        "<tr><th>base model sha256</th><td><code>{}</code></td></tr>\n",
        esc(&provenance.base_model.sha256)
    ));
    h.push_str(&format!(
        "<tr><th>seed</th><td>{}</td></tr>\n",
        provenance.seed
    ));
    // Compact JSON with sorted keys, as the machine was shown before it was typed.
    h.push_str(&format!(
        "<tr><th>machine</th><td>{}</td></tr>\n",
        esc(&serde_json::to_value(&provenance.machine)?.to_string())
    ));
    h.push_str(&format!(
        "<tr><th>total seconds</th><td>{:.0}</td></tr>\n",
        provenance.total_seconds
    ));
    for (k, v) in &provenance.datasets_sha256 {
        h.push_str(&format!(
            "<tr><th>dataset {}</th><td><code>{}</code></td></tr>\n",
            esc(k),
            esc(&serde_json::to_string(v)?)
        ));
    }
    h.push_str("</table>\n");
    // A figure that renders with zero size, or with text running past its edges (a long title,
    // a label), is a broken report: say so on the page (and in a body attribute that the
    // browser test reads). Screen rectangles, so rotated axis titles are measured as drawn.
    h.push_str(
        "<script>window.addEventListener('load',function(){var bad=[],over=[];\
         var f=document.querySelectorAll('figure svg');f.forEach(function(s,i){\
         var r=s.getBoundingClientRect();if(!(r.width>0&&r.height>0)){bad.push(i);return;}\
         s.querySelectorAll('text').forEach(function(t){var b=t.getBoundingClientRect();\
         if(b.width>0&&(b.left<r.left-1||b.right>r.right+1||b.top<r.top-1||\
         b.bottom>r.bottom+1))over.push(i+':'+t.textContent.trim().slice(0,40));});});\
         document.body.setAttribute('data-figure-check',bad.length?('zero-size '+bad.join(',')):\
         over.length?('overflow '+over.join(' | ')):('ok '+f.length));\
         if(bad.length||over.length){var p=document.createElement('p');\
         p.textContent='Warning: '+bad.length+' figure(s) rendered with zero size, '+\
         over.length+' text(s) past a figure edge.';\
         p.style.color='#c0392b';document.body.prepend(p);}});</script>\n",
    );
    h.push_str("</body></html>\n");
    write_atomic(&dir.join("report.html"), h.as_bytes())
}
