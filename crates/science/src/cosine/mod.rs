//! Existence of safety layers (paper §3.2-3.3): cosine similarity of last-token hidden vectors
//! for normal/normal (N-N), malicious/malicious (M-M) and normal/malicious (N-M) pairs, per
//! hidden-state entry. Each prompt runs through the model once; pairs are formed from the cache.

pub mod figure;
pub mod file;
pub mod range_rule;
pub mod report;

use crate::cosine::range_rule::{initial_range, InitialRange, RULE};
use crate::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How pairs are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pairs {
    /// R random pairs per type, reproducible from the seed.
    Sampled(usize),
    /// Every distinct pair: N-N and M-M all unordered pairs, N-M the full product.
    All,
}

impl std::str::FromStr for Pairs {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            return Ok(Pairs::All);
        }
        match s.parse::<usize>() {
            Ok(r) if r > 0 => Ok(Pairs::Sampled(r)),
            _ => bail!("--pairs `{s}`: expected a positive number of pairs or `all`"),
        }
    }
}

/// Unit-normalised last-token vectors of one prompt set: `[prompt][entry][hidden]`, in f64.
pub struct Vectors {
    pub v: Vec<Vec<Vec<f64>>>,
}

impl Vectors {
    /// From the engine's `[entries, hidden]` tensors; zero vectors are refused (cosine undefined).
    pub fn from_tensors(states: &[candle_core::Tensor], set: &str) -> Result<Vectors> {
        let mut v = Vec::with_capacity(states.len());
        for (i, t) in states.iter().enumerate() {
            let rows = t.to_vec2::<f32>()?;
            let mut p = Vec::with_capacity(rows.len());
            for (k, r) in rows.iter().enumerate() {
                let norm = r
                    .iter()
                    .map(|x| (*x as f64) * (*x as f64))
                    .sum::<f64>()
                    .sqrt();
                if norm <= 0.0 || !norm.is_finite() {
                    bail!(
                        "{set} prompt {i}: hidden-state entry {k} is zero or not finite; its \
                         cosine is undefined"
                    );
                }
                p.push(r.iter().map(|x| *x as f64 / norm).collect());
            }
            v.push(p);
        }
        Ok(Vectors { v })
    }

    pub fn len(&self) -> usize {
        self.v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    fn entries(&self) -> usize {
        self.v.first().map(|p| p.len()).unwrap_or(0)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn degrees(c: f64) -> f64 {
    c.clamp(-1.0, 1.0).acos().to_degrees()
}

/// Statistics of one hidden-state entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryStats {
    /// transformers' hidden-state index: 0 = embeddings, e = output of layer e-1.
    pub entry: usize,
    pub nn_mean: f64,
    pub nn_std: f64,
    pub mm_mean: f64,
    pub mm_std: f64,
    pub nm_mean: f64,
    pub nm_std: f64,
    /// deg(acos(mean N-M)) - deg(acos(mean N-N)): what the paper's official code plots.
    pub gap_code_deg: f64,
    /// mean over pairs of angle(n, m) - mean over pairs of angle(n, n'): the paper's formula.
    pub gap_paper_deg: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairCounts {
    pub nn: usize,
    pub mm: usize,
    pub nm: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Curves {
    pub entries: Vec<EntryStats>,
    pub pair_counts: PairCounts,
    pub initial_range: Option<InitialRange>,
    pub rule: &'static str,
}

impl Curves {
    /// The entry with the largest code gap.
    pub fn largest_gap(&self) -> Option<&EntryStats> {
        self.entries
            .iter()
            .max_by(|a, b| a.gap_code_deg.total_cmp(&b.gap_code_deg))
    }
}

/// Running mean / population std (ddof = 0) and mean angle.
#[derive(Default)]
struct Acc {
    n: usize,
    sum: f64,
    sum_sq: f64,
    sum_deg: f64,
}

impl Acc {
    fn add(&mut self, c: f64) {
        self.n += 1;
        self.sum += c;
        self.sum_sq += c * c;
        self.sum_deg += degrees(c);
    }
    fn mean(&self) -> f64 {
        self.sum / self.n as f64
    }
    fn std(&self) -> f64 {
        let m = self.mean();
        (self.sum_sq / self.n as f64 - m * m).max(0.0).sqrt()
    }
    fn mean_deg(&self) -> f64 {
        self.sum_deg / self.n as f64
    }
}

type PairList = Vec<(usize, usize)>;

/// The pairs of each type: (N-N, M-M, N-M) as index pairs.
fn pair_lists(n: usize, m: usize, pairs: Pairs, seed: u64) -> (PairList, PairList, PairList) {
    match pairs {
        Pairs::All => {
            let within = |k: usize| -> PairList {
                (0..k)
                    .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
                    .collect()
            };
            let cross: PairList = (0..n).flat_map(|i| (0..m).map(move |j| (i, j))).collect();
            (within(n), within(m), cross)
        }
        Pairs::Sampled(r) => {
            // One stream per pair type (as the paper's code seeds each type separately).
            let distinct = |k: usize, rng: &mut Rng| -> PairList {
                (0..r)
                    .map(|_| {
                        let i = rng.below(k);
                        let mut j = rng.below(k - 1);
                        if j >= i {
                            j += 1;
                        }
                        (i, j)
                    })
                    .collect()
            };
            let mut r_nn = Rng::new(seed.wrapping_mul(3).wrapping_add(10));
            let mut r_mm = Rng::new(seed.wrapping_mul(3).wrapping_add(100));
            let mut r_nm = Rng::new(seed.wrapping_mul(3).wrapping_add(1000));
            let nn = distinct(n, &mut r_nn);
            let mm = distinct(m, &mut r_mm);
            let nm = (0..r).map(|_| (r_nm.below(n), r_nm.below(m))).collect();
            (nn, mm, nm)
        }
    }
}

/// Per-entry statistics of the three pair types, and the initial safety range read off the gap.
pub fn curves(normal: &Vectors, malicious: &Vectors, pairs: Pairs, seed: u64) -> Result<Curves> {
    if normal.len() < 2 || malicious.len() < 2 {
        bail!(
            "the cosine analysis needs at least 2 prompts in each set (normal: {}, malicious: {})",
            normal.len(),
            malicious.len()
        );
    }
    if normal.entries() != malicious.entries() {
        bail!("normal and malicious vectors come from models with different layer counts");
    }
    let (nn, mm, nm) = pair_lists(normal.len(), malicious.len(), pairs, seed);
    let mut entries = Vec::with_capacity(normal.entries());
    for e in 0..normal.entries() {
        let mut a = [Acc::default(), Acc::default(), Acc::default()];
        for &(i, j) in &nn {
            a[0].add(dot(&normal.v[i][e], &normal.v[j][e]));
        }
        for &(i, j) in &mm {
            a[1].add(dot(&malicious.v[i][e], &malicious.v[j][e]));
        }
        for &(i, j) in &nm {
            a[2].add(dot(&normal.v[i][e], &malicious.v[j][e]));
        }
        entries.push(EntryStats {
            entry: e,
            nn_mean: a[0].mean(),
            nn_std: a[0].std(),
            mm_mean: a[1].mean(),
            mm_std: a[1].std(),
            nm_mean: a[2].mean(),
            nm_std: a[2].std(),
            gap_code_deg: degrees(a[2].mean()) - degrees(a[0].mean()),
            gap_paper_deg: a[2].mean_deg() - a[0].mean_deg(),
        });
    }
    let gap: Vec<f64> = entries.iter().map(|s| s.gap_code_deg).collect();
    Ok(Curves {
        initial_range: initial_range(&gap),
        entries,
        pair_counts: PairCounts {
            nn: nn.len(),
            mm: mm.len(),
            nm: nm.len(),
        },
        rule: RULE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: Vec<f64>) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    #[test]
    fn exact_statistics_by_hand() {
        // One entry, 2-d vectors: normals at 0 and 90 degrees, malicious at 180 and 270.
        let normal = Vectors {
            v: vec![vec![unit(vec![1.0, 0.0])], vec![vec![0.0, 1.0]]],
        };
        let malicious = Vectors {
            v: vec![vec![vec![-1.0, 0.0]], vec![vec![0.0, -1.0]]],
        };
        let c = curves(&normal, &malicious, Pairs::All, 0).unwrap();
        let s = &c.entries[0];
        assert_eq!(
            (c.pair_counts.nn, c.pair_counts.mm, c.pair_counts.nm),
            (1, 1, 4)
        );
        assert!((s.nn_mean - 0.0).abs() < 1e-12 && s.nn_std.abs() < 1e-12);
        // N-M cosines: -1, 0, 0, -1 -> mean -0.5, std 0.5; angles 180, 90, 90, 180 -> 135.
        assert!((s.nm_mean + 0.5).abs() < 1e-12 && (s.nm_std - 0.5).abs() < 1e-12);
        assert!((s.gap_code_deg - (120.0 - 90.0)).abs() < 1e-9);
        assert!((s.gap_paper_deg - (135.0 - 90.0)).abs() < 1e-9);
    }

    #[test]
    fn sampled_pairs_are_reproducible_and_distinct() {
        let (a, _, c) = pair_lists(5, 7, Pairs::Sampled(300), 3);
        let (b, _, d) = pair_lists(5, 7, Pairs::Sampled(300), 3);
        assert_eq!(a, b);
        assert_eq!(c, d);
        assert!(a.iter().all(|(i, j)| i != j && *i < 5 && *j < 5));
        assert!(c.iter().all(|(i, j)| *i < 5 && *j < 7));
        let (e, _, _) = pair_lists(5, 7, Pairs::Sampled(300), 4);
        assert_ne!(a, e, "another seed, other pairs");
        let (all, _, cross) = pair_lists(5, 7, Pairs::All, 0);
        assert_eq!((all.len(), cross.len()), (10, 35));
    }

    #[test]
    fn too_few_prompts() {
        let one = Vectors {
            v: vec![vec![vec![1.0, 0.0]]],
        };
        let two = Vectors {
            v: vec![vec![vec![1.0, 0.0]], vec![vec![0.0, 1.0]]],
        };
        let e = curves(&one, &two, Pairs::All, 0).unwrap_err().to_string();
        assert!(e.contains("at least 2 prompts"), "{e}");
    }
}
