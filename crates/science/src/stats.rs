//! Binomial proportions with a 95% Wilson score interval (no continuity correction; Newcombe
//! 1998, method 3). Unlike the normal approximation it stays inside [0, 1] and is not empty at
//! 0 or n successes, which matters for rates near 0% such as an aligned model's R_h.

use serde::Serialize;

/// The 0.975 quantile of the standard normal distribution.
pub const Z95: f64 = 1.959963984540054;

/// `count` of `n`, the rate and its 95% Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Proportion {
    pub count: usize,
    pub n: usize,
    pub rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

/// The Wilson interval of `count` successes in `n` trials at normal quantile `z`; None when n = 0
/// or count > n.
pub fn wilson(count: usize, n: usize, z: f64) -> Option<(f64, f64)> {
    if n == 0 || count > n {
        return None;
    }
    let (k, n) = (count as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // At 0 and n the bound is exactly 0 or 1; rounding would otherwise leave ±1e-17.
    let low = if count == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let high = if count as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    Some((low, high))
}

impl Proportion {
    /// None when n = 0 (an empty set has no rate) or count > n.
    pub fn new(count: usize, n: usize) -> Option<Proportion> {
        let (ci95_low, ci95_high) = wilson(count, n, Z95)?;
        Some(Proportion {
            count,
            n,
            rate: count as f64 / n as f64,
            ci95_low,
            ci95_high,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcombe_1998_table() {
        // Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score),
        // published to 4 decimals.
        for (k, n, lo, hi) in [
            (81, 263, 0.2553, 0.3662),
            (15, 148, 0.0624, 0.1605),
            (0, 20, 0.0, 0.1611),
            (1, 29, 0.0061, 0.1718),
        ] {
            let (l, h) = wilson(k, n, Z95).unwrap();
            assert!(
                (l - lo).abs() < 5e-5 && (h - hi).abs() < 5e-5,
                "{k}/{n}: ({l}, {h}) vs ({lo}, {hi})"
            );
        }
    }

    #[test]
    fn edges_and_shape() {
        assert_eq!(wilson(0, 0, Z95), None);
        assert_eq!(wilson(3, 2, Z95), None);
        let all = Proportion::new(520, 520).unwrap();
        assert_eq!((all.rate, all.ci95_high), (1.0, 1.0));
        assert!(all.ci95_low > 0.99 && all.ci95_low < 1.0);
        let none = Proportion::new(0, 520).unwrap();
        assert_eq!((none.rate, none.ci95_low), (0.0, 0.0));
        assert!(none.ci95_high > 0.0 && none.ci95_high < 0.01);
        // The interval holds the rate, is symmetric under k -> n-k, and narrows as n grows.
        for (k, n) in [(1, 3), (30, 520), (260, 520), (7, 731)] {
            let p = Proportion::new(k, n).unwrap();
            assert!(p.ci95_low < p.rate && p.rate < p.ci95_high, "{k}/{n}");
            let (l2, h2) = wilson(n - k, n, Z95).unwrap();
            assert!(
                (p.ci95_low - (1.0 - h2)).abs() < 1e-12 && (p.ci95_high - (1.0 - l2)).abs() < 1e-12
            );
        }
        let small = wilson(5, 10, Z95).unwrap();
        let big = wilson(500, 1000, Z95).unwrap();
        assert!(big.1 - big.0 < small.1 - small.0);
    }
}
