//! Rouge-L F1 (Lin 2004): precision, recall and F1 of the longest common subsequence of tokens.
//!
//! Tokenisation is that of Google's `rouge-score` package (its default, no stemmer), so numbers
//! compare with papers that used it: the text is lower-cased (Unicode lower-casing), every run of
//! characters other than ASCII `a-z` / `0-9` becomes a token boundary, and empty pieces are
//! dropped. So punctuation, whitespace and non-ASCII letters all separate tokens and are not
//! tokens themselves: "Don't panic, 42!" -> ["don", "t", "panic", "42"].
//! The whole text is one sequence (rougeL, not the sentence-split rougeLsum).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl RougeScore {
    pub const ZERO: RougeScore = RougeScore {
        precision: 0.0,
        recall: 0.0,
        f1: 0.0,
    };
}

/// Tokens as `rouge-score` makes them (see the module comment).
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence, two DP rows of the shorter sequence's length.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut prev = vec![0usize; short.len() + 1];
    let mut cur = vec![0usize; short.len() + 1];
    for x in long {
        for (j, y) in short.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[short.len()]
}

/// Rouge-L of `prediction` against `reference`; zero when either has no tokens. The arithmetic
/// is `rouge-score`'s, operation for operation, so the f64 results are the same.
pub fn rouge_l(prediction: &str, reference: &str) -> RougeScore {
    let p = tokenize(prediction);
    let r = tokenize(reference);
    if p.is_empty() || r.is_empty() {
        return RougeScore::ZERO;
    }
    let lcs = lcs_len(&r, &p) as f64;
    let precision = lcs / p.len() as f64;
    let recall = lcs / r.len() as f64;
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    RougeScore {
        precision,
        recall,
        f1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenisation_by_hand() {
        assert_eq!(tokenize("Don't panic, 42!"), ["don", "t", "panic", "42"]);
        assert_eq!(tokenize("  The\tCAT\n\nsat.  "), ["the", "cat", "sat"]);
        assert_eq!(tokenize("e-mail: a@b.com"), ["e", "mail", "a", "b", "com"]);
        // Non-ASCII letters separate tokens; "é" is not a token character.
        assert_eq!(tokenize("café crème"), ["caf", "cr", "me"]);
        assert!(tokenize("...!?  --").is_empty());
        assert!(tokenize("").is_empty());
    }

    #[test]
    fn lcs_by_hand() {
        let a: Vec<char> = "ABCBDAB".chars().collect();
        let b: Vec<char> = "BDCABA".chars().collect();
        assert_eq!(lcs_len(&a, &b), 4); // CLRS: BCBA
        assert_eq!(lcs_len(&b, &a), 4);
        assert_eq!(lcs_len::<char>(&[], &a), 0);
        assert_eq!(lcs_len(&a, &a), 7);
        assert_eq!(lcs_len(&['x'], &['y']), 0);
    }

    #[test]
    fn rouge_l_by_hand() {
        // Tokens: p = the cat sat on the mat (6), r = the cat is on the mat (6);
        // LCS = the cat on the mat (5).
        let s = rouge_l("The cat sat on the mat.", "the cat is on the mat");
        assert_eq!((s.precision, s.recall), (5.0 / 6.0, 5.0 / 6.0));
        assert!((s.f1 - 5.0 / 6.0).abs() < 1e-15);
        // p = police killed the gunman (4), r = police kill the gunman (4);
        // LCS = police the gunman (3).
        let s = rouge_l("police killed the gunman", "police kill the gunman");
        assert_eq!((s.precision, s.recall, s.f1), (0.75, 0.75, 0.75));
        // p = a b (2), r = a x b y (4): LCS 2, P = 1, R = 0.5, F = 2*0.5/1.5 = 2/3.
        let s = rouge_l("a b", "a x b y");
        assert_eq!((s.precision, s.recall), (1.0, 0.5));
        assert!((s.f1 - 2.0 / 3.0).abs() < 1e-15);
        // Order matters: reversed tokens share only one in sequence.
        let s = rouge_l("c b a", "a b c");
        assert!((s.f1 - 1.0 / 3.0).abs() < 1e-15);
        // Identical after tokenisation (case, punctuation): 1; disjoint: 0; an empty side: 0.
        assert_eq!(rouge_l("Hello, World!", "hello world").f1, 1.0);
        assert_eq!(rouge_l("alpha beta", "gamma delta").f1, 0.0);
        assert_eq!(rouge_l("", "gamma delta"), RougeScore::ZERO);
        assert_eq!(rouge_l("!!!", "gamma"), RougeScore::ZERO);
    }
}
