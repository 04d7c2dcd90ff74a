//! Charts carry text (issue 19): a title, axis labels and a legend naming each negative, drawn
//! with the shipped font. Checked on the pixels: ink where the text must be, none where the
//! same chart has nothing to say.

use reneg::eval::report::{Report, Row};
use reneg::eval::stats::Summary;
use std::path::Path;

/// Dark pixels (text and lines are black or near it) in the rectangle [x0, x1) x [y0, y1).
fn ink(png: &Path, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> usize {
    let img = reneg::io::read_png(png).unwrap();
    let mut n = 0;
    for y in y0..y1.min(img.height) {
        for x in x0..x1.min(img.width) {
            let p = &img.data[3 * (y * img.width + x)..3 * (y * img.width + x) + 3];
            n += p.iter().all(|&c| c < 110) as usize;
        }
    }
    n
}

fn row(reward: &str, negative: &str, mean: f64) -> Row {
    Row {
        reward: reward.into(),
        negative: negative.into(),
        summary: Summary {
            n: 8,
            mean,
            ci95: [mean - 1.0, mean + 1.0],
            delta_vs_first: 0.0,
            delta_ci95: [0.0, 0.0],
            win_rate_vs_first: None,
        },
        non_finite: 0,
    }
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-charts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_eval_chart_has_titles_axes_and_a_legend_naming_each_negative() {
    let negatives = vec![
        "null".to_string(),
        "prompt:blurry, noisy".to_string(),
        "runs/hps/embedding.safetensors".to_string(),
    ];
    let rewards = vec!["hps".to_string(), "aesthetic".to_string()];
    let results = rewards
        .iter()
        .flat_map(|r| {
            negatives
                .iter()
                .enumerate()
                .map(move |(j, n)| row(r, n, 10.0 + j as f64))
        })
        .collect();
    let report = Report {
        model: "m".into(),
        negatives: negatives.clone(),
        rewards,
        units_planned: 8,
        units_complete: 8,
        results,
        categories: vec![],
        grids: vec![],
        bar_chart: None,
    };
    let d = dir("bar");
    let out = d.join("chart.png");
    reneg::eval::grid::bar_chart(&report, &out).unwrap();
    let img = reneg::io::read_png(&out).unwrap();
    // Two panels of 300 px, 360 px high, then one legend row of 22 px per negative.
    assert_eq!((img.width, img.height), (600, 360 + 16 + 22 * 3));
    // Each panel's title (the reward's name) in its top strip, centred.
    for panel in 0..2 {
        let x = 300 * panel;
        assert!(
            ink(&out, (x + 100, 0, x + 200, 28)) > 20,
            "no title in panel {panel}"
        );
    }
    // The y-axis description, left of each panel's axis.
    assert!(ink(&out, (0, 100, 24, 300)) > 20, "no y-axis description");
    // Each legend row: text right of the colour box, proportional to the name's length.
    let rows: Vec<usize> = (0..3)
        .map(|j| ink(&out, (40, 368 + 22 * j, 600, 368 + 22 * j + 20)))
        .collect();
    assert!(rows.iter().all(|&n| n > 15), "{rows:?}");
    assert!(rows[0] < rows[1] && rows[0] < rows[2], "{rows:?}");
    // Nothing under the last legend row.
    assert_eq!(ink(&out, (0, 368 + 22 * 3, 600, img.height)), 0);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_reward_curve_has_a_title_axis_labels_and_a_legend() {
    let d = dir("curve");
    let metrics = d.join("metrics.jsonl");
    let lines: Vec<String> = (0..50)
        .map(|s| {
            format!(
                "{{\"step\":{s},\"reward_mean\":{}}}",
                (s as f64 * 0.3).sin()
            )
        })
        .collect();
    std::fs::write(&metrics, lines.join("\n")).unwrap();
    let out = d.join("reward_curve.png");
    reneg::train::plot::reward_curve(&metrics, &out).unwrap();
    let img = reneg::io::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (720, 420));
    // Title strip, the x-axis description at the bottom, the y-axis description on the left.
    assert!(ink(&out, (200, 0, 520, 36)) > 50, "no title");
    assert!(
        ink(&out, (300, 395, 420, 420)) > 10,
        "no x-axis description"
    );
    assert!(ink(&out, (0, 120, 30, 300)) > 20, "no y-axis description");
    // The legend box in the lower right holds its two labels.
    assert!(ink(&out, (540, 300, 710, 365)) > 60, "no legend");
    let _ = std::fs::remove_dir_all(&d);
}
