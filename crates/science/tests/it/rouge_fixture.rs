//! Rouge-L against Google's `rouge-score` package on 50 committed pairs
//! (tools/fixtures/make_rouge_fixture.py). The arithmetic is the same, so the numbers are equal.

use crate::common::fixture;
use sl_science::eval::rouge::rouge_l;

#[test]
fn rouge_l_equals_rouge_score_on_50_pairs() {
    let p = fixture("rouge/rouge_l_pairs.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let pairs = doc["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 50);
    let mut partial = 0;
    for (i, pair) in pairs.iter().enumerate() {
        let s = rouge_l(
            pair["prediction"].as_str().unwrap(),
            pair["reference"].as_str().unwrap(),
        );
        let want = |k: &str| pair[k].as_f64().unwrap();
        assert_eq!(s.precision, want("precision"), "pair {i} precision: {pair}");
        assert_eq!(s.recall, want("recall"), "pair {i} recall: {pair}");
        assert!(
            (s.f1 - want("f1")).abs() <= 1e-15,
            "pair {i} f1 {} vs {}: {pair}",
            s.f1,
            want("f1")
        );
        partial += (s.f1 > 0.0 && s.f1 < 1.0) as usize;
    }
    assert!(
        partial >= 30,
        "most pairs overlap partly, so the LCS itself is exercised"
    );
}
