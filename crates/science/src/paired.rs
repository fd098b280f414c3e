//! Two models judged on the same prompts: paired counts, the exact McNemar test, the difference
//! of the two rates with a 95% interval, a combined test across seeds, and the power to detect a
//! given difference. These are what "SPPFT keeps R_h below full fine-tuning" is tested with: the
//! arms answer the same prompts, so a per-prompt paired test uses the pairing that independent
//! Wilson intervals ignore.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Per-prompt outcomes of models A and B (true: the event counted, e.g. a harmful answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paired {
    pub n: usize,
    pub both: usize,
    /// A yes, B no.
    pub only_a: usize,
    /// B yes, A no.
    pub only_b: usize,
    pub neither: usize,
}

impl Paired {
    /// Counts from per-prompt outcomes in the same prompt order.
    pub fn from_outcomes(a: &[bool], b: &[bool]) -> Result<Paired> {
        if a.len() != b.len() {
            bail!(
                "paired outcomes: {} prompts for A, {} for B (they must be the same prompts)",
                a.len(),
                b.len()
            );
        }
        let mut p = Paired {
            n: a.len(),
            both: 0,
            only_a: 0,
            only_b: 0,
            neither: 0,
        };
        for (&x, &y) in a.iter().zip(b) {
            match (x, y) {
                (true, true) => p.both += 1,
                (true, false) => p.only_a += 1,
                (false, true) => p.only_b += 1,
                (false, false) => p.neither += 1,
            }
        }
        Ok(p)
    }

    pub fn rate_a(&self) -> f64 {
        (self.both + self.only_a) as f64 / self.n as f64
    }

    pub fn rate_b(&self) -> f64 {
        (self.both + self.only_b) as f64 / self.n as f64
    }

    /// rate A − rate B.
    pub fn difference(&self) -> f64 {
        (self.only_a as f64 - self.only_b as f64) / self.n as f64
    }

    /// The Wald interval of the difference for paired data (Agresti, Categorical Data Analysis,
    /// 3rd ed., §11.1.1): SE = √((b + c) − (b − c)²/n) / n, clipped to [−1, 1]. With few
    /// discordant pairs it is too narrow; the exact test (`mcnemar_p`) is the one to read then.
    pub fn difference_ci95(&self) -> (f64, f64) {
        let (b, c, n) = (self.only_a as f64, self.only_b as f64, self.n as f64);
        let se = ((b + c) - (b - c).powi(2) / n).max(0.0).sqrt() / n;
        let d = self.difference();
        let z = crate::stats::Z95;
        ((d - z * se).max(-1.0), (d + z * se).min(1.0))
    }

    /// The tables of several seeds summed (the prompts counted once per seed).
    pub fn pooled(tables: &[Paired]) -> Paired {
        let sum = |f: fn(&Paired) -> usize| tables.iter().map(f).sum();
        Paired {
            n: sum(|t| t.n),
            both: sum(|t| t.both),
            only_a: sum(|t| t.only_a),
            only_b: sum(|t| t.only_b),
            neither: sum(|t| t.neither),
        }
    }

    /// Two-sided exact McNemar test of equal rates.
    pub fn mcnemar_p(&self) -> f64 {
        mcnemar_exact(self.only_a, self.only_b)
    }
}

/// The exact (binomial) McNemar test: under equal rates each of the `b + c` discordant pairs
/// falls either way with probability 1/2; two-sided p = min(1, 2 P(X <= min(b, c))), X ~
/// Bin(b + c, 1/2). 1 without discordant pairs.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // log pmf(0) = -n ln 2; pmf(i + 1) = pmf(i) (n - i) / (i + 1); summed in log space so that
    // thousands of pairs neither underflow nor overflow.
    let mut log_pmf = -(n as f64) * std::f64::consts::LN_2;
    let mut log_cdf = log_pmf;
    for i in 0..k {
        log_pmf += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
        let (hi, lo) = if log_cdf > log_pmf {
            (log_cdf, log_pmf)
        } else {
            (log_pmf, log_cdf)
        };
        log_cdf = hi + (lo - hi).exp().ln_1p();
    }
    (2.0 * log_cdf.exp()).min(1.0)
}

/// A p-value as a report prints it: "p = 0.039" down to 0.001, then "p = 2.3e-7" (three
/// decimals would print every strong result as 0.000), and "p < 1e-300" where the exact value
/// underflowed to 0.
pub fn p_text(p: f64) -> String {
    if p >= 0.001 {
        format!("p = {p:.3}")
    } else if p > 0.0 {
        format!("p = {p:.1e}")
    } else {
        "p < 1e-300".into()
    }
}

/// One test across seeds: the exact McNemar test on the discordant pairs of all seeds pooled.
/// Each seed is a separate fine-tune judged on the same prompts; under "equal rates in every
/// seed" each discordant pair of each seed is an independent fair coin, so their total is
/// Bin(sum of discordant pairs, 1/2) and the pooled exact test keeps its level. It gains power
/// over any single seed when the seeds agree in direction.
pub fn mcnemar_combined(seeds: &[Paired]) -> f64 {
    let b = seeds.iter().map(|p| p.only_a).sum();
    let c = seeds.iter().map(|p| p.only_b).sum();
    mcnemar_exact(b, c)
}

/// Mean and sample standard deviation (n − 1; 0 for one value); None for no values.
pub fn mean_sd(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() < 2 {
        0.0
    } else {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    Some((mean, sd))
}

/// Standard normal CDF (Abramowitz and Stegun 7.1.26 for erf, absolute error below 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.3275911 * x.abs() / std::f64::consts::SQRT_2);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Approximate power of the two-sided McNemar test at level 0.05 to detect a difference `delta`
/// between paired rates over `n` prompts when a fraction `discordant` of prompts is discordant
/// (Connor 1987): Φ((|δ|√n − z √ψ) / √(ψ − δ²)). None where ψ <= δ² (no such table exists).
pub fn mcnemar_power(n: usize, discordant: f64, delta: f64) -> Option<f64> {
    let (psi, d) = (discordant, delta.abs());
    // NaN inputs fail this test too.
    if psi.partial_cmp(&(d * d)) != Some(std::cmp::Ordering::Greater) || n == 0 {
        return None;
    }
    let z = crate::stats::Z95;
    Some(normal_cdf(
        (d * (n as f64).sqrt() - z * psi.sqrt()) / (psi - d * d).sqrt(),
    ))
}

/// The smallest difference between paired rates that the two-sided McNemar test at level 0.05
/// detects with probability `power` over `n` prompts when a fraction `discordant` of them is
/// discordant (`mcnemar_power` solved for δ by bisection; it rises with δ on (0, √ψ)). None
/// where no difference reaches that power.
pub fn detectable_difference(n: usize, discordant: f64, power: f64) -> Option<f64> {
    let top = discordant.sqrt();
    let at = |d: f64| mcnemar_power(n, discordant, d);
    // Just below √ψ, where the variance ψ − δ² stays positive.
    if at(top * (1.0 - 1e-9))? < power {
        return None;
    }
    let (mut lo, mut hi) = (0.0, top * (1.0 - 1e-9));
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if at(mid).is_some_and(|p| p >= power) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_values_print_with_their_magnitude() {
        assert_eq!(p_text(158.0 / 4096.0), "p = 0.039");
        assert_eq!(p_text(1.0), "p = 1.000");
        // Exact McNemar with 0 vs 29 discordant pairs: 2 * 2^-29 = 3.725e-9 (scipy's binomtest).
        assert_eq!(p_text(mcnemar_exact(0, 29)), "p = 3.7e-9");
        assert_eq!(p_text(0.000_999), "p = 1.0e-3");
        assert_eq!(p_text(0.0), "p < 1e-300");
    }

    #[test]
    fn detectable_difference_inverts_connors_sample_size() {
        // Connor (1987): n = (z_a √ψ + z_b √(ψ − δ²))² / δ²; δ = 0.1, ψ = 0.2, power 0.8:
        // (1.95996 · 0.447214 + 0.841621 · 0.435890)² / 0.01 = 154.6 prompts. So 155 prompts
        // detect a little under 10 points, 154 a little over.
        let d155 = detectable_difference(155, 0.2, 0.8).unwrap();
        let d154 = detectable_difference(154, 0.2, 0.8).unwrap();
        assert!(d155 < 0.1 && d155 > 0.099, "{d155}");
        assert!(d154 > 0.1 && d154 < 0.101, "{d154}");
        assert!((mcnemar_power(155, 0.2, d155).unwrap() - 0.8).abs() < 1e-9);
        // More prompts, smaller detectable differences; none where even δ → √ψ is too weak.
        assert!(detectable_difference(1000, 0.2, 0.8).unwrap() < d155);
        assert_eq!(detectable_difference(3, 0.01, 0.8), None);
    }

    #[test]
    fn exact_mcnemar_equals_the_binomial_by_hand() {
        // 2 vs 10: 2 P(X <= 2 | 12, 1/2) = 2 (1 + 12 + 66) / 4096.
        assert!((mcnemar_exact(2, 10) - 158.0 / 4096.0).abs() < 1e-15);
        assert_eq!(mcnemar_exact(10, 2), mcnemar_exact(2, 10));
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // 0 vs 6: 2 / 64.
        assert!((mcnemar_exact(0, 6) - 2.0 / 64.0).abs() < 1e-15);
        // Large counts stay finite and agree with the normal approximation's order.
        let p = mcnemar_exact(150, 86);
        assert!(p > 1e-6 && p < 1e-4, "{p}");
    }

    /// Agresti's presidential-approval table (Categorical Data Analysis, Table 11.1): 794, 150,
    /// 86, 570 of 1600: difference 0.04, SE 0.0095, 95% interval (0.021, 0.059).
    #[test]
    fn agresti_example() {
        let p = Paired {
            n: 1600,
            both: 794,
            only_a: 150,
            only_b: 86,
            neither: 570,
        };
        assert!((p.rate_a() - 0.59).abs() < 1e-12 && (p.rate_b() - 0.55).abs() < 1e-12);
        assert!((p.difference() - 0.04).abs() < 1e-12);
        let (lo, hi) = p.difference_ci95();
        assert!(
            (lo - 0.021).abs() < 5e-4 && (hi - 0.059).abs() < 5e-4,
            "{lo} {hi}"
        );
        let from = Paired::from_outcomes(
            &[true, true, false, false, true],
            &[true, false, true, false, false],
        )
        .unwrap();
        assert_eq!(
            (from.both, from.only_a, from.only_b, from.neither),
            (1, 2, 1, 1)
        );
        assert!(Paired::from_outcomes(&[true], &[]).is_err());
    }

    #[test]
    fn combined_test_pools_discordant_pairs() {
        let s = |b, c| Paired {
            n: 100,
            both: 10,
            only_a: b,
            only_b: c,
            neither: 90 - b - c,
        };
        let seeds = [s(1, 4), s(0, 3), s(2, 5)];
        assert_eq!(mcnemar_combined(&seeds), mcnemar_exact(3, 12));
        // Each seed alone is not significant; together they are.
        assert!(seeds.iter().all(|p| p.mcnemar_p() > 0.05));
        assert!(mcnemar_combined(&seeds) < 0.05);
    }

    #[test]
    fn normal_cdf_power_and_spread() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-9);
        assert!((normal_cdf(crate::stats::Z95) - 0.975).abs() < 2e-7);
        assert!((normal_cdf(-1.0) - 0.158655254).abs() < 2e-7);
        // Connor's formula by hand: n 200, 20% discordant, 10 points: Φ(1.2336) = 0.8914.
        let p = mcnemar_power(200, 0.2, 0.1).unwrap();
        assert!((p - 0.8914).abs() < 1e-3, "{p}");
        assert!(mcnemar_power(64, 0.2, 0.1).unwrap() < p);
        assert_eq!(mcnemar_power(100, 0.01, 0.1), None);
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((m - 2.5).abs() < 1e-12 && (sd - 1.2909944487).abs() < 1e-9);
        assert_eq!(mean_sd(&[3.0]), Some((3.0, 0.0)));
        assert_eq!(mean_sd(&[]), None);
    }
}
