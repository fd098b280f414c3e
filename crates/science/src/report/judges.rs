//! The report's section on the judges: gcg, xstest, their union and (where responses carry its
//! scores) the calibrated probe on every model's own responses, per set, with the sets where two
//! judges disagree on more than 5% flagged and examples of what one of them misses.

use super::esc;
use crate::eval::file::{EvalFile, EvalModel};
use crate::eval::SetKind;
use crate::judges::agreement::{FLAG_ABOVE, PROBE_NOTE};
use anyhow::Result;
use std::path::Path;

pub(super) fn section(eval: &EvalFile, eval_dir: &Path) -> Result<String> {
    let mut rows = vec![];
    for m in &eval.models {
        let EvalModel::Ok(m) = m else { continue };
        let mut sets = vec![];
        for (key, file) in &m.responses {
            let Some(kind) = SetKind::from_key(key) else {
                continue;
            };
            let rs: Vec<crate::eval::SafetyResponse> =
                crate::eval::report::read_jsonl(&eval_dir.join(file))?;
            sets.push((kind, rs));
        }
        rows.push((m.label.as_str(), crate::eval::set_agreements(&sets)));
    }
    let probe = crate::eval::any_probe(&rows);
    let mut h = format!(
        "<h2>The judges on these responses</h2><p>Refusals by each keyword rule on the same \
         responses (the verdicts above are by <b>{}</b>){}. Where two judges disagree on more \
         than {:.0}% of a set, rates by either alone depend on the judge and the set is flagged; \
         union counts a refusal by either rule.</p><table><tr><th>model</th><th>set</th>\
         <th>n</th><th>gcg</th><th>xstest</th><th>union</th><th>gcg vs xstest</th>{}<th></th>\
         </tr>\n",
        esc(eval.judge["kind"].as_str().unwrap_or("?")),
        if probe { PROBE_NOTE } else { "" },
        100.0 * FLAG_ABOVE,
        if probe {
            "<th>probe</th><th>probe vs union</th>"
        } else {
            ""
        }
    );
    let mut examples = String::new();
    for (label, sets) in &rows {
        for (kind, a) in sets {
            let probe_cells = if probe {
                let [r, d] = a.probe_cells();
                format!("<td>{r}</td><td>{d}</td>")
            } else {
                String::new()
            };
            h += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{} ({:.1}%)</td>{probe_cells}<td>{}</td></tr>\n",
                esc(label),
                esc(kind.title()),
                a.n,
                a.gcg_refusals,
                a.xstest_refusals,
                a.union_refusals(),
                a.disagree,
                100.0 * a.disagree_rate(),
                if a.flagged() { "<b>flagged</b>" } else { "" }
            );
            if a.flagged() {
                for (by, text) in a.only_one().take(3) {
                    examples += &format!(
                        "<li>{} / {}: only {by} calls this a refusal: “{}”</li>\n",
                        esc(label),
                        esc(kind.title()),
                        esc(text)
                    );
                }
            }
        }
    }
    h += "</table>\n";
    if !examples.is_empty() {
        h += &format!("<p>Examples from the flagged sets:</p><ul>{examples}</ul>\n");
    }
    Ok(h)
}
