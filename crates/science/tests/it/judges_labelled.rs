//! The refusal judges on a committed, hand-labelled set of responses
//! (tests/fixtures/judges/labelled_responses.jsonl): refusals in many phrasings, compliances that
//! contain trigger words such as "illegal", and empty responses. Each line holds the human label
//! and the verdict each judge's published rule gives; the known misses of the keyword judges
//! are part of the fixture, so a change in either list shows up here.

use crate::common::fixture;
use sl_science::judges::{Judge, JudgeKind};

fn labelled() -> Vec<serde_json::Value> {
    let p = fixture("judges/labelled_responses.jsonl");
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn verdicts_equal_the_labels() {
    let set = labelled();
    let count = |h: &str| set.iter().filter(|v| v["human"] == h).count();
    assert!(count("refusal") >= 15 && count("compliance") >= 15 && count("empty") >= 3);
    let triggers = set
        .iter()
        .filter(|v| v["human"] == "compliance" && v["gcg"] == true)
        .count();
    assert!(
        triggers >= 8,
        "compliances that trip the GCG list: {triggers}"
    );
    for kind in [JudgeKind::Gcg, JudgeKind::Xstest] {
        let j = Judge::new(kind);
        let key = if kind == JudgeKind::Gcg {
            "gcg"
        } else {
            "xstest"
        };
        for v in &set {
            let r = v["response"].as_str().unwrap();
            assert_eq!(
                j.is_refusal(r),
                v[key].as_bool().unwrap(),
                "{key} on {r:?} ({})",
                v["note"]
            );
        }
    }
}

#[test]
fn empty_responses_are_not_refusals() {
    // An empty answer to a harmful prompt counts toward R_h under both keyword rules; eval
    // reports such responses separately (`empty`) so they can be told apart.
    for kind in [JudgeKind::Gcg, JudgeKind::Xstest] {
        let j = Judge::new(kind);
        for v in labelled().iter().filter(|v| v["human"] == "empty") {
            assert!(!j.is_refusal(v["response"].as_str().unwrap()));
        }
    }
}

#[test]
fn agreement_with_the_human_labels() {
    // On the non-empty responses: the GCG list flags trigger words in compliances (false
    // refusals), XSTest's prefixes miss refusals that do not open with a known phrase.
    let set: Vec<_> = labelled()
        .into_iter()
        .filter(|v| v["human"] != "empty")
        .collect();
    let agree = |kind| {
        let j = Judge::new(kind);
        set.iter()
            .filter(|v| j.is_refusal(v["response"].as_str().unwrap()) == (v["human"] == "refusal"))
            .count()
    };
    assert_eq!(
        (agree(JudgeKind::Gcg), agree(JudgeKind::Xstest), set.len()),
        (21, 30, 40)
    );
}

#[test]
fn early_verdicts_never_contradict_the_final_one() {
    for kind in [JudgeKind::Gcg, JudgeKind::Xstest] {
        let j = Judge::new(kind);
        for v in labelled() {
            let full = v["response"].as_str().unwrap();
            let fin = j.is_refusal(full);
            for (cut, _) in full
                .char_indices()
                .chain(std::iter::once((full.len(), ' ')))
            {
                if let Some(early) = j.decided(&full[..cut]) {
                    assert_eq!(early, fin, "{kind:?} on {full:?} cut at {cut}");
                }
            }
        }
    }
}
