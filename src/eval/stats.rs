//! Paired statistics of a side-by-side comparison: every negative is scored on the same units
//! (prompt, seed), so intervals come from one bootstrap over units shared by all negatives.

use crate::rng::SplitMix64;

/// Bootstrap resamples: enough for stable 2.5% / 97.5% percentiles.
pub const RESAMPLES: usize = 2000;
/// The bootstrap's seed: reports are reproducible to the digit.
const SEED: u64 = 0x5EED_B007;

/// One negative's summary for one reward.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// 95% percentile-bootstrap interval of the mean.
    pub ci95: [f64; 2],
    /// Mean difference to the first negative, and its paired 95% interval.
    pub delta_vs_first: f64,
    pub delta_ci95: [f64; 2],
    /// Share of units where this negative scores above the first (ties count half); `None` for
    /// the first negative itself.
    pub win_rate_vs_first: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// The 2.5% and 97.5% percentiles of `v` (sorted in place): the order statistics at ranks
/// round(q (R - 1)). Reported as they are, also where they miss the point estimate (a
/// percentile interval can, for tiny or skewed samples, or by a rounding error where every
/// resample gives the same value).
fn interval(v: &mut [f64]) -> [f64; 2] {
    if v.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    [at(0.025), at(0.975)]
}

/// Summaries of `scores[negative][unit]` (all negatives scored on the same units, in the same
/// order), against negative 0.
pub fn summarize(scores: &[Vec<f64>]) -> Vec<Summary> {
    let units = scores.first().map_or(0, Vec::len);
    debug_assert!(scores.iter().all(|s| s.len() == units));
    let means: Vec<f64> = scores.iter().map(|s| mean(s.iter().copied())).collect();
    let mut boot = vec![Vec::with_capacity(RESAMPLES); scores.len()];
    let mut boot_delta = vec![Vec::with_capacity(RESAMPLES); scores.len()];
    if units > 0 {
        let mut rng = SplitMix64::new(SEED);
        let mut pick = vec![0usize; units];
        for _ in 0..RESAMPLES {
            for p in pick.iter_mut() {
                *p = (rng.next_u64() % units as u64) as usize;
            }
            let base = mean(pick.iter().map(|&i| scores[0][i]));
            for (j, s) in scores.iter().enumerate() {
                let m = mean(pick.iter().map(|&i| s[i]));
                boot[j].push(m);
                boot_delta[j].push(m - base);
            }
        }
    }
    scores
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let delta = means[j] - means[0];
            Summary {
                n: units,
                mean: means[j],
                ci95: interval(&mut boot[j]),
                delta_vs_first: delta,
                delta_ci95: interval(&mut boot_delta[j]),
                win_rate_vs_first: (j > 0 && units > 0).then(|| win_rate(s, &scores[0])),
            }
        })
        .collect()
}

/// Share of pairs where `a` beats `b`, ties counting half.
pub fn win_rate(a: &[f64], b: &[f64]) -> f64 {
    mean(a.iter().zip(b).map(|(x, y)| match x.total_cmp(y) {
        std::cmp::Ordering::Greater => 1.0,
        std::cmp::Ordering::Equal => 0.5,
        std::cmp::Ordering::Less => 0.0,
    }))
}
