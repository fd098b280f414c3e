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

/// The first layer at whose output the aligned model's gap differs from the base model's by at
/// least 1 degree (the rule's own smallest gap): where the safety training first changed the
/// curve. The paper's rule reads the aligned model alone and so can pick a gap the base model has
/// as well; a positive control asks whether the curves part inside the planted layers. `gap[e]`
/// per hidden-state entry as in `initial_range`; None when the lengths differ or they never part.
pub fn parting_layer(aligned: &[f64], base: &[f64]) -> Option<usize> {
    if aligned.len() != base.len() {
        return None;
    }
    let e = aligned
        .iter()
        .zip(base)
        .position(|(a, b)| (a - b).abs() >= 1.0)?;
    // Entry 0 is the embeddings, identical in models of one base; entry e is layer e - 1.
    Some(e.saturating_sub(1))
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
    fn the_curves_part_where_only_the_aligned_model_changes() {
        // Both models open a gap over layers 7-9; only the aligned one rises again, over 14-17.
        // The paper's rule on the aligned curve alone picks the shared 7-9; the curves part at 14.
        let base = curve(30, 7, 9, 3.0, 0.1, 0.0);
        let extra = curve(30, 14, 17, 2.0, 0.0, 0.0);
        // `extra` creeps up by 0.1 per layer before 14: 1.4 degrees by then, so take that off.
        let lift = extra[14];
        let aligned: Vec<f64> = base
            .iter()
            .zip(&extra)
            .map(|(b, x)| b + (x - lift).max(0.0))
            .collect();
        assert_eq!(
            initial_range(&aligned).map(|r| (r.first, r.last)),
            Some((7, 9))
        );
        assert_eq!(parting_layer(&aligned, &base), Some(14));
        assert_eq!(
            parting_layer(&base, &base),
            None,
            "identical curves never part"
        );
        assert_eq!(parting_layer(&aligned, &base[1..]), None);
        // A shift below 1 degree everywhere is not a parting.
        let close: Vec<f64> = base.iter().map(|b| b + 0.9).collect();
        assert_eq!(parting_layer(&close, &base), None);
    }

    #[test]
    fn no_gap_no_range() {
        // A base model: N-M tracks N-N within a fraction of a degree everywhere (paper Fig. 3).
        let g: Vec<f64> = (0..=30).map(|e| 0.3 * ((e as f64) * 0.7).sin()).collect();
        assert_eq!(initial_range(&g), None);
        assert_eq!(initial_range(&[]), None);
    }
}
