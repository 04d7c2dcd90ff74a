//! Pictures of a comparison: image grids (prompt rows x negative columns) and a bar chart of
//! the mean reward per negative with its interval, titled, with axes and a legend naming
//! each negative (`crate::chart` holds the font).

use super::report::{Report, COLOURS};
use super::Manifest;
use crate::error::{Error, Result};
use crate::io::{read_png, write_png, Rgb};
use plotters::prelude::*;
use std::path::Path;

/// Prompts per grid file, and the most prompts shown in grids at all.
const ROWS_PER_GRID: usize = 8;
const MAX_GRID_PROMPTS: usize = 48;
const GAP: usize = 4;

/// The label column left of the rows, and a line of the header band over the columns, in
/// pixels.
const LABEL: usize = 180;
const LINE: usize = 17;

/// Grids of the first seed's images under `dir/grids/`; returns their paths relative to `dir`.
/// The header names the negatives and numbers the columns, each row is labelled with its
/// prompt (shortened, in the shipped font), so a grid explains itself pasted on its own. A
/// missing image (an unfinished unit) is a grey cell.
pub fn write_grids(dir: &Path, m: &Manifest) -> Result<Vec<String>> {
    let (cw, ch) = (m.width, m.height);
    let cols = m.negatives.len();
    let prompts = m.prompts.len().min(MAX_GRID_PROMPTS);
    let w = LABEL + cols * (cw + GAP) + GAP;
    let legend = legend_lines(m, w);
    // The legend's lines, then the columns' numbers.
    let header = LINE * (legend.len() + 1) + GAP;
    let mut out = vec![];
    for (g, start) in (0..prompts).step_by(ROWS_PER_GRID).enumerate() {
        let rows = ROWS_PER_GRID.min(prompts - start);
        let h = header + rows * (ch + GAP) + GAP;
        let mut img = Rgb {
            width: w,
            height: h,
            data: vec![255; 3 * w * h],
        };
        for r in 0..rows {
            for c in 0..cols {
                let file = dir.join(Manifest::image_path(c, start + r, m.base_seed));
                let cell = read_png(&file)
                    .ok()
                    .filter(|i| i.width == cw && i.height == ch);
                let (x0, y0) = (LABEL + GAP + c * (cw + GAP), header + GAP + r * (ch + GAP));
                for y in 0..ch {
                    let dst = 3 * ((y0 + y) * w + x0);
                    match &cell {
                        Some(cell) => img.data[dst..dst + 3 * cw]
                            .copy_from_slice(&cell.data[3 * y * cw..3 * (y + 1) * cw]),
                        None => img.data[dst..dst + 3 * cw].fill(200),
                    }
                }
            }
        }
        let rel = format!("grids/grid_{g:02}.png");
        label_grid(&mut img, m, (start, rows), &legend, header)
            .map_err(|e| Error::file(dir.join(&rel), format!("cannot draw its labels: {e}")))?;
        write_png(&img, &dir.join(&rel), None)?;
        out.push(rel);
    }
    Ok(out)
}

/// The header's legend for a grid `w` pixels wide: "columns: 1 = NEG · 2 = NEG ...", wrapped
/// (at most 4 lines).
fn legend_lines(m: &Manifest, w: usize) -> Vec<String> {
    let text = m
        .negatives
        .iter()
        .enumerate()
        .map(|(c, n)| format!("{} = {n}", c + 1))
        .collect::<Vec<_>>()
        .join(" · ");
    // About 7 px a character at 12 px.
    wrap(&format!("columns: {text}"), (w - 2 * GAP) / 7, 4)
}

/// Draws the legend and each column's number in the header band (`header` pixels high), and
/// the prompts (rows `start..start + rows`) left of the rows, wrapped to the label column and
/// cut with an ellipsis.
fn label_grid(
    img: &mut Rgb,
    m: &Manifest,
    (start, rows): (usize, usize),
    legend: &[String],
    header: usize,
) -> std::result::Result<(), String> {
    let (w, h) = (img.width as u32, img.height as u32);
    let (cw, ch) = (m.width, m.height);
    let root = BitMapBackend::with_buffer(&mut img.data, (w, h)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    for (k, line) in legend.iter().enumerate() {
        let y = (GAP + LINE * k) as i32;
        root.draw(&Text::new(
            line.clone(),
            (GAP as i32, y),
            crate::chart::text(12.0),
        ))
        .map_err(err)?;
    }
    for c in 0..m.negatives.len() {
        let x = (LABEL + GAP + c * (cw + GAP)) as i32;
        let y = (header - LINE) as i32;
        root.draw(&Text::new(
            format!("{}", c + 1),
            (x, y),
            crate::chart::text(13.0),
        ))
        .map_err(err)?;
    }
    let line_chars = (LABEL - 2 * GAP) / 7;
    for r in 0..rows {
        let y0 = (header + GAP + r * (ch + GAP)) as i32;
        let text = &m.prompts[start + r].text;
        let max_lines = (ch / 16).clamp(1, 6);
        for (k, line) in wrap(text, line_chars, max_lines).iter().enumerate() {
            root.draw(&Text::new(
                line.clone(),
                (GAP as i32, y0 + 16 * k as i32),
                crate::chart::text(12.0),
            ))
            .map_err(err)?;
        }
    }
    root.present().map_err(err)
}

/// `text` in lines of at most `width` characters (words kept whole where they fit), at most
/// `lines` of them, the last ending in an ellipsis when text is left over.
pub fn wrap(text: &str, width: usize, lines: usize) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let fits =
            cur.chars().count() + word.chars().count() + usize::from(!cur.is_empty()) <= width;
        if !fits && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    let cut = out.len() > lines;
    out.truncate(lines);
    let out: Vec<String> = out
        .into_iter()
        .map(|l| crate::chart::shorten(&l, width))
        .collect();
    match (cut, out.split_last()) {
        (true, Some((last, rest))) => {
            let mut v = rest.to_vec();
            v.push(crate::chart::shorten(&format!("{last} …"), width));
            v
        }
        _ => out,
    }
}

/// One panel per reward: a bar per negative (mean) with its 95% interval as a whisker; the
/// legend under the panels names each negative by its colour.
pub fn bar_chart(r: &Report, out: &Path) -> Result<()> {
    let panels = r.rewards.len().max(1);
    let legend_rows = r.negatives.len();
    let legend_h = 16 + 22 * legend_rows as u32;
    crate::chart::write_png(out, |tmp| {
        let root =
            BitMapBackend::new(tmp, (300 * panels as u32, 360 + legend_h)).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<_>| Error::file(out, format!("cannot draw: {e}"));
        root.fill(&WHITE).map_err(draw)?;
        let (top, legend) = root.split_vertically(360);
        for (area, reward) in top.split_evenly((1, panels)).iter().zip(&r.rewards) {
            let rows: Vec<_> = r.results.iter().filter(|x| &x.reward == reward).collect();
            let lo = rows
                .iter()
                .map(|x| x.summary.ci95[0])
                .fold(f64::MAX, f64::min);
            let hi = rows
                .iter()
                .map(|x| x.summary.ci95[1])
                .fold(f64::MIN, f64::max);
            if !(lo.is_finite() && hi.is_finite()) {
                continue;
            }
            let pad = ((hi - lo) * 0.15).max(1e-6);
            let base = lo - pad;
            let mut chart = ChartBuilder::on(area)
                .margin(14)
                .caption(crate::chart::shorten(reward, 28), crate::chart::text(18.0))
                .x_label_area_size(30)
                .y_label_area_size(58)
                .build_cartesian_2d(0f64..rows.len() as f64, base..hi + pad)
                .map_err(draw)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(WHITE)
                // The bars are numbered as in the legend instead.
                .x_labels(0)
                .x_desc("negative (numbered as in the legend)")
                .y_desc("mean score, 95% CI")
                .axis_desc_style(crate::chart::text(14.0))
                .label_style(crate::chart::text(13.0))
                .draw()
                .map_err(draw)?;
            for (j, row) in rows.iter().enumerate() {
                let (cr, cg, cb) = COLOURS[j % COLOURS.len()];
                let x = j as f64;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x + 0.15, base), (x + 0.85, row.summary.mean)],
                        RGBColor(cr, cg, cb).filled(),
                    )))
                    .map_err(draw)?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{}", j + 1),
                        (x + 0.44, base + pad * 0.9),
                        crate::chart::text(14.0),
                    )))
                    .map_err(draw)?;
                let [a, b] = row.summary.ci95;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x + 0.5, a), (x + 0.5, b)],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(draw)?;
                for y in [a, b] {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(x + 0.35, y), (x + 0.65, y)],
                            BLACK.stroke_width(2),
                        )))
                        .map_err(draw)?;
                }
            }
        }
        // The legend: colour, number, the negative as given.
        let max_chars = (300 * panels) / 8;
        for (j, name) in r.negatives.iter().enumerate() {
            let (cr, cg, cb) = COLOURS[j % COLOURS.len()];
            let y = 8 + 22 * j as i32;
            legend
                .draw(&Rectangle::new(
                    [(16, y + 2), (32, y + 16)],
                    RGBColor(cr, cg, cb).filled(),
                ))
                .map_err(draw)?;
            let label = crate::chart::shorten(&format!("{}  {name}", j + 1), max_chars);
            legend
                .draw(&Text::new(label, (40, y + 1), crate::chart::text(14.0)))
                .map_err(draw)?;
        }
        root.present().map_err(draw)
    })
}
