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
    let tmp = out.with_extension("png.tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (640, 360)).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<_>| Error::file(out, format!("cannot draw: {e}"));
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .build_cartesian_2d(0f64..xmax.max(1.0), (ymin - pad)..(ymax + pad))
            .map_err(draw)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .draw()
            .map_err(draw)?;
        chart
            .draw_series(LineSeries::new(points, RGBColor(170, 190, 230)))
            .map_err(draw)?;
        chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::file(out, format!("cannot write: {e}")))
}
