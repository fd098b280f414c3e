//! The report's section on the judges: gcg, xstest and their union on every model's own
//! responses, per set, with the sets where gcg and xstest disagree on more than 5% flagged and
//! examples of what one of them misses.

use super::esc;
use crate::eval::file::{EvalFile, EvalModel};
use crate::eval::SetKind;
use crate::judges::agreement::{Agreement, FLAG_ABOVE};
use anyhow::Result;
use std::path::Path;

pub(super) fn section(eval: &EvalFile, eval_dir: &Path) -> Result<String> {
    let mut h = format!(
        "<h2>The judges on these responses</h2><p>Refusals by each keyword rule on the same \
         responses (the verdicts above are by <b>{}</b>). Where gcg and xstest disagree on more \
         than {:.0}% of a set, rates by either alone depend on the rule and the set is flagged; \
         union counts a refusal by either.</p><table><tr><th>model</th><th>set</th><th>n</th>\
         <th>gcg</th><th>xstest</th><th>union</th><th>disagree</th><th></th></tr>\n",
        esc(eval.judge["kind"].as_str().unwrap_or("?")),
        100.0 * FLAG_ABOVE
    );
    let mut examples = String::new();
    for m in &eval.models {
        let EvalModel::Ok(m) = m else { continue };
        for (key, file) in &m.responses {
            let Some(kind) = SetKind::from_key(key) else {
                continue;
            };
            let rs: Vec<crate::eval::SafetyResponse> =
                crate::eval::report::read_jsonl(&eval_dir.join(file))?;
            let a = Agreement::of(rs.iter().map(|r| r.response.as_str()));
            h += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{} ({:.1}%)</td><td>{}</td></tr>\n",
                esc(&m.label),
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
                for (by, text) in a.examples.iter().take(2) {
                    examples += &format!(
                        "<li>{} / {}: only {} calls this a refusal: “{}”</li>\n",
                        esc(&m.label),
                        esc(kind.title()),
                        by.name(),
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
