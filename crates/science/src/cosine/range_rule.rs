//! Reading the initial safety range off the angle-gap curve. The paper reads it by eye, "from the
//! appearance of the gap to the first smoothing"; this is a deterministic version of that reading.

use serde::{Deserialize, Serialize};

pub const RULE: &str = "g_k = code angle gap (degrees) at the output of layer k; \
    d_k = g_k - g_(k-1) is the growth layer k adds (d_0 against the embedding entry). p = the \
    layer of largest growth D = d_p. The range starts at the earliest layer i <= p such that every \
    layer from i to p grows by at least D/4 (the gap appears), and ends at the last layer j >= p \
    before the first layer whose growth drops below D/4 (the first smoothing). No range if \
    D < 1 degree (no gap opens).";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialRange {
    pub first: usize,
    pub last: usize,
    /// The layer where the gap grows fastest.
    pub steepest: usize,
}

/// `gap[e]` for every hidden-state entry e (0 = embeddings, e = output of layer e-1).
pub fn initial_range(gap: &[f64]) -> Option<InitialRange> {
    if gap.len() < 2 {
        return None;
    }
    let growth: Vec<f64> = gap.windows(2).map(|w| w[1] - w[0]).collect(); // growth[k] = layer k
    let (p, &d) = growth
        .iter()
        .enumerate()
        .fold((0, &f64::NEG_INFINITY), |best, (k, d)| {
            if *d > *best.1 {
                (k, d)
            } else {
                best
            }
        });
    // A NaN growth (from a NaN gap) opens no range either.
    if d.is_nan() || d < 1.0 {
        return None;
    }
    let floor = d / 4.0;
    let mut first = p;
    while first > 0 && growth[first - 1] >= floor {
        first -= 1;
    }
    let mut last = p;
    while last + 1 < growth.len() && growth[last + 1] >= floor {
        last += 1;
    }
    Some(InitialRange {
        first,
        last,
        steepest: p,
    })
}

/// The same rule on the growth of the aligned model's gap *over the base model's* (`aligned[e] -
/// base[e]`, both per hidden-state entry): where the safety training changed the curve, rather
/// than where a gap opens that the base model has as well. The paper reads the aligned model
/// alone; this is the reading a positive control needs (a planted band is where the two curves
/// part). None when the curves have different lengths or part by less than 1 degree per layer.
pub fn departure_range(aligned: &[f64], base: &[f64]) -> Option<InitialRange> {
    if aligned.len() != base.len() {
        return None;
    }
    let diff: Vec<f64> = aligned.iter().zip(base).map(|(a, b)| a - b).collect();
    initial_range(&diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gap curve over `layers` layers (plus the embedding entry) that is flat, rises by `rise`
    /// degrees per layer over [a, b], then creeps up by `tail` per layer.
    fn curve(layers: usize, a: usize, b: usize, rise: f64, tail: f64, noise: f64) -> Vec<f64> {
        let mut g = vec![0.0];
        for k in 0..layers {
            let step = if k < a {
                0.1 + noise * ((k * 7919) % 13) as f64 / 13.0
            } else if k <= b {
                rise * (1.0 + 0.3 * (((k * 31) % 5) as f64 / 5.0 - 0.5))
            } else {
                tail
            };
            g.push(g.last().unwrap() + step);
        }
        g
    }

    #[test]
    fn paper_shaped_curves_give_the_published_initial_ranges() {
        // Initial ranges implied by the paper's sweeps (PAPER.md): Llama-3 [7,12] of 32 layers,
        // Llama-2 [9,14] of 32, gemma-2b [8,11] of 18, Phi-3 [11,15] of 32.
        for (layers, a, b) in [(32, 7, 12), (32, 9, 14), (18, 8, 11), (32, 11, 15)] {
            let g = curve(layers, a, b, 4.0, 0.4, 0.2);
            let r = initial_range(&g).expect("a gap opens");
            assert_eq!((r.first, r.last), (a, b), "curve rising over [{a},{b}]");
            assert!(r.steepest >= a && r.steepest <= b);
        }
    }

    #[test]
    fn smooth_sigmoid_gap() {
        // A logistic rise centred on layer 10: the range brackets the centre.
        let g: Vec<f64> = (0..=32)
            .map(|e| 20.0 / (1.0 + (-(e as f64 - 1.0 - 10.0) / 1.2).exp()))
            .collect();
        let r = initial_range(&g).unwrap();
        assert!(
            r.first >= 7 && r.first <= 9 && r.last >= 11 && r.last <= 13,
            "{r:?}"
        );
    }

    #[test]
    fn departure_ignores_what_the_base_model_shares() {
        // Both models open a gap over layers 7-9; only the aligned one rises again over 14-17.
        let base = curve(30, 7, 9, 3.0, 0.1, 0.0);
        let extra = curve(30, 14, 17, 2.0, 0.0, 0.0);
        let aligned: Vec<f64> = base.iter().zip(&extra).map(|(b, x)| b + x).collect();
        assert_eq!(
            initial_range(&aligned).map(|r| (r.first, r.last)),
            Some((7, 9))
        );
        let d = departure_range(&aligned, &base).expect("the curves part");
        assert_eq!((d.first, d.last), (14, 17));
        assert_eq!(
            departure_range(&base, &base),
            None,
            "identical curves never part"
        );
        assert_eq!(departure_range(&aligned, &base[1..]), None);
    }

    #[test]
    fn no_gap_no_range() {
        // A base model: N-M tracks N-N within a fraction of a degree everywhere (paper Fig. 3).
        let g: Vec<f64> = (0..=30).map(|e| 0.3 * ((e as f64) * 0.7).sin()).collect();
        assert_eq!(initial_range(&g), None);
        assert_eq!(initial_range(&[]), None);
    }
}
