//! The reward curve of a run as a PNG (reward mean per step, and its running mean).

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// Plots `metrics.jsonl`'s `reward_mean` against `step` into `out` (written atomically).
pub fn reward_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::file(metrics, e.to_string()))?;
    let points: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v["step"].as_f64()?,
                v["reward_mean"].as_f64().filter(|r| r.is_finite())?,
            ))
        })
        .collect();
    if points.len() < 2 {
        return Ok(());
    }
    let window = (points.len() / 20).max(1);
    let smooth: Vec<(f64, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let lo = i.saturating_sub(window - 1);
            let w = &points[lo..=i];
            (s, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let (xmax, ymin, ymax) = points
        .iter()
        .fold((0f64, f64::MAX, f64::MIN), |(x, lo, hi), &(s, r)| {
            (x.max(s), lo.min(r), hi.max(r))
        });
    let pad = ((ymax - ymin) * 0.05).max(1e-6);
    let n = points.len();
    crate::chart::write_png(out, |tmp| {
        let root = BitMapBackend::new(tmp, (720, 420)).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<_>| Error::file(out, format!("cannot draw: {e}"));
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .caption(
                format!("Reward during training ({n} steps)"),
                crate::chart::text(20.0),
            )
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..xmax.max(1.0), (ymin - pad)..(ymax + pad))
            .map_err(draw)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .y_desc("reward (batch mean)")
            .axis_desc_style(crate::chart::text(15.0))
            .label_style(crate::chart::text(13.0))
            .draw()
            .map_err(draw)?;
        let light = RGBColor(170, 190, 230);
        chart
            .draw_series(LineSeries::new(points, light))
            .map_err(draw)?
            .label("each step")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light));
        chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(draw)?
            .label(if window == 1 {
                "running mean (1 step)".to_string()
            } else {
                format!("running mean over {window} steps")
            })
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(crate::chart::text(13.0))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)
    })
}
