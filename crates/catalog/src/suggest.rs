//! "Did you mean": the catalog names closest to a misspelled one, so that a new user's typo
//! (`advbnch`, `smollm2-135m-instrct`) is answered with the name meant, not only a list.

/// Edit distance counting insertions, deletions, substitutions and swaps of two neighbouring
/// characters (optimal string alignment), case-insensitively.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * w + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let sub = d[(i - 1) * w + j - 1] + usize::from(a[i - 1] != b[j - 1]);
                let mut best = sub.min(d[(i - 1) * w + j] + 1).min(d[i * w + j - 1] + 1);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    best = best.min(d[(i - 2) * w + j - 2] + 1);
                }
                best
            };
        }
    }
    d[a.len() * w + b.len()]
}

/// The candidates nearest to `name` (ties together, at most three), if any is within a third
/// of its length (at least one edit): a typo, not a different name.
pub fn closest<'a>(name: &str, candidates: &[&'a str]) -> Vec<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    let mut scored: Vec<(usize, &str)> = candidates
        .iter()
        .map(|c| (distance(name, c), *c))
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    let best = scored.first().map(|(d, _)| *d);
    scored
        .into_iter()
        .filter(|(d, _)| Some(*d) == best)
        .take(3)
        .map(|(_, c)| c)
        .collect()
}

/// `"; did you mean `x`?"` (or `` `x` or `y` ``) for the closest candidates; empty if none.
pub fn did_you_mean(name: &str, candidates: &[&str]) -> String {
    let near = closest(name, candidates);
    if near.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = near.iter().map(|c| format!("`{c}`")).collect();
    format!("; did you mean {}?", quoted.join(" or "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_edits_and_swaps() {
        assert_eq!(distance("advbench", "advbench"), 0);
        assert_eq!(distance("advbnch", "advbench"), 1);
        assert_eq!(distance("advbecnh", "advbench"), 1);
        assert_eq!(distance("XSTest", "xstest"), 0);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn only_near_names_are_suggested() {
        let names = ["advbench", "harmbench", "xstest", "alpaca"];
        assert_eq!(closest("advbnch", &names), vec!["advbench"]);
        assert_eq!(closest("something-else", &names), Vec::<&str>::new());
        assert_eq!(did_you_mean("xstets", &names), "; did you mean `xstest`?");
        assert_eq!(did_you_mean("zzz", &names), "");
    }
}
