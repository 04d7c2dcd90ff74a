//! The comparison report: its numbers (`report.json`) and their markdown (`report.md`), built
//! from the manifest and the records alone (so shards merged give the unsharded report);
//! [`super::output`] writes them with the grids and the chart.

use super::stats::{self, Summary};
use super::{Manifest, Record};
use std::collections::{BTreeMap, BTreeSet};

/// The negatives' colours in the chart (`super::grid` draws with them; the report names them).
pub const COLOURS: [(u8, u8, u8); 6] = [
    (120, 120, 120),
    (230, 140, 40),
    (50, 110, 200),
    (60, 160, 80),
    (170, 70, 160),
    (200, 60, 60),
];
pub const COLOUR_NAMES: [&str; 6] = ["grey", "orange", "blue", "green", "purple", "red"];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub reward: String,
    pub negative: String,
    #[serde(flatten)]
    pub summary: Summary,
    /// Complete units where this negative's score is not finite (a reward that returned NaN).
    /// Units with a non-finite score for any negative are left out of this reward's paired
    /// statistics (`summary.n` counts the rest).
    #[serde(default)]
    pub non_finite: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CategoryRow {
    pub category: String,
    pub reward: String,
    pub negative: String,
    pub n: usize,
    pub mean: f64,
    pub ci95: [f64; 2],
    pub win_rate_vs_first: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub model: String,
    pub negatives: Vec<String>,
    pub rewards: Vec<String>,
    /// Units (prompt, seed) planned, and those with a score for every negative and reward.
    pub units_planned: usize,
    pub units_complete: usize,
    pub results: Vec<Row>,
    pub categories: Vec<CategoryRow>,
    pub grids: Vec<String>,
    pub bar_chart: Option<String>,
}

/// `scores[negative][unit]` for `reward` over `units`.
fn matrix(
    by_key: &BTreeMap<(usize, u64, usize, String), Record>,
    units: &[(usize, u64)],
    negatives: usize,
    reward: &str,
) -> Vec<Vec<f64>> {
    (0..negatives)
        .map(|j| {
            units
                .iter()
                .map(|&(p, s)| by_key[&(p, s, j, reward.to_string())].score)
                .collect()
        })
        .collect()
}

/// Builds the report from the run's records (any order, duplicates allowed).
pub fn build(m: &Manifest, records: Vec<Record>) -> Report {
    let by_key = super::dedup(records);
    let complete: Vec<(usize, u64)> = m
        .units()
        .into_iter()
        .filter(|&(p, s)| {
            (0..m.negatives.len()).all(|j| {
                m.rewards
                    .iter()
                    .all(|r| by_key.contains_key(&(p, s, j, r.clone())))
            })
        })
        .collect();
    let mut results = vec![];
    let mut categories = vec![];
    let cats: BTreeSet<String> = m
        .prompts
        .iter()
        .filter_map(|p| p.category.clone())
        .collect();
    for reward in &m.rewards {
        let all = matrix(&by_key, &complete, m.negatives.len(), reward);
        let non_finite: Vec<usize> = all
            .iter()
            .map(|s| s.iter().filter(|v| !v.is_finite()).count())
            .collect();
        // Paired statistics over the units where every negative has a finite score.
        let complete: Vec<(usize, u64)> = complete
            .iter()
            .enumerate()
            .filter(|&(u, _)| all.iter().all(|s| s[u].is_finite()))
            .map(|(_, &unit)| unit)
            .collect();
        let scores = matrix(&by_key, &complete, m.negatives.len(), reward);
        for (j, summary) in stats::summarize(&scores).into_iter().enumerate() {
            results.push(Row {
                reward: reward.clone(),
                negative: m.negatives[j].clone(),
                summary,
                non_finite: non_finite[j],
            });
        }
        for cat in &cats {
            let units: Vec<(usize, u64)> = complete
                .iter()
                .copied()
                .filter(|&(p, _)| m.prompts[p].category.as_deref() == Some(cat.as_str()))
                .collect();
            let scores = matrix(&by_key, &units, m.negatives.len(), reward);
            for (j, s) in stats::summarize(&scores).into_iter().enumerate() {
                categories.push(CategoryRow {
                    category: cat.clone(),
                    reward: reward.clone(),
                    negative: m.negatives[j].clone(),
                    n: s.n,
                    mean: s.mean,
                    ci95: s.ci95,
                    win_rate_vs_first: s.win_rate_vs_first,
                });
            }
        }
    }
    Report {
        model: m.model.clone(),
        negatives: m.negatives.clone(),
        rewards: m.rewards.clone(),
        units_planned: m.units().len(),
        units_complete: complete.len(),
        results,
        categories,
        grids: vec![],
        bar_chart: None,
    }
}

fn fmt(x: f64) -> String {
    format!("{x:.4}")
}

fn pct(w: Option<f64>) -> String {
    w.map_or("-".into(), |w| format!("{:.1}%", 100.0 * w))
}

/// `report.md`: one table per reward, the category breakdown, the grids and the chart.
pub fn markdown(r: &Report, m: &Manifest) -> String {
    let mut s = String::new();
    s.push_str("# Negatives compared\n\n");
    s.push_str(&format!(
        "Model `{}`; {} prompt(s) x {} seed(s) = {} unit(s), {} complete; {} DDIM steps, guidance {}, {}x{} px. \
         Every negative starts from the same noise per unit, so comparisons are paired. Intervals: 95% percentile \
         bootstrap over units ({} resamples); win rate: share of units scoring above `{}` (ties half).\n\n",
        r.model, m.prompts.len(), m.seeds, r.units_planned, r.units_complete, m.steps, m.guidance_scale,
        m.width, m.height, stats::RESAMPLES, r.negatives.first().map(String::as_str).unwrap_or("")
    ));
    for reward in &r.rewards {
        s.push_str(&format!("## {reward}\n\n"));
        if let Some(role) = m.roles.get(reward) {
            s.push_str(&format!("*{role}*\n\n"));
        }
        s.push_str("| negative | mean | 95% CI | vs first | 95% CI of difference | win rate | non-finite |\n|---|---|---|---|---|---|---|\n");
        let rows: Vec<&Row> = r.results.iter().filter(|x| &x.reward == reward).collect();
        for row in &rows {
            let u = &row.summary;
            s.push_str(&format!(
                "| `{}` | {} | [{}, {}] | {:+.4} | [{:+.4}, {:+.4}] | {} | {} |\n",
                row.negative,
                fmt(u.mean),
                fmt(u.ci95[0]),
                fmt(u.ci95[1]),
                u.delta_vs_first,
                u.delta_ci95[0],
                u.delta_ci95[1],
                pct(u.win_rate_vs_first),
                row.non_finite
            ));
        }
        let bad: usize = rows.iter().map(|r| r.non_finite).sum();
        if bad > 0 {
            s.push_str(&format!(
                "\n{bad} score(s) of this reward are not finite (NaN); their units are left out of the statistics above ({} unit(s) remain).\n",
                rows.first().map_or(0, |r| r.summary.n)
            ));
        }
        s.push('\n');
    }
    if !r.categories.is_empty() {
        s.push_str("## By category\n\n| category | reward | negative | n | mean | 95% CI | win rate |\n|---|---|---|---|---|---|---|\n");
        for c in &r.categories {
            s.push_str(&format!(
                "| {} | {} | `{}` | {} | {} | [{}, {}] | {} |\n",
                c.category,
                c.reward,
                c.negative,
                c.n,
                fmt(c.mean),
                fmt(c.ci95[0]),
                fmt(c.ci95[1]),
                pct(c.win_rate_vs_first)
            ));
        }
        s.push('\n');
    }
    if let Some(chart) = &r.bar_chart {
        s.push_str(&format!(
            "## Chart\n\n![mean reward per negative]({chart})\n\nOne panel per reward (in the order above); bars are the \
             negatives in order, colours {}; whiskers are the 95% intervals.\n\n",
            r.negatives
                .iter()
                .enumerate()
                .map(|(j, n)| format!("{} = `{n}`", COLOUR_NAMES[j % COLOURS.len()]))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !r.grids.is_empty() {
        s.push_str("## Images\n\nRows: prompts (first seed); columns: the negatives in order.\n\n");
        for g in &r.grids {
            s.push_str(&format!("![grid]({g})\n\n"));
        }
    }
    s
}
