//! The files an evaluation leaves in its folder: `report.json` and `report.md` (built by
//! [`super::report`]), `report.html` (the page, [`super::html`]), the image grids and the
//! chart (drawn by [`super::grid`]). The one place
//! that writes them, so the report's numbers and its pictures never come from two runs.

use super::{report, Manifest, Record};
use crate::error::{Error, Result};
use std::path::Path;

/// Writes `report.json`, `report.md`, `report.html` (its images inside it when `embed`), the
/// grids and the chart into `dir` (atomically).
pub fn write(
    dir: &Path,
    m: &Manifest,
    records: Vec<Record>,
    embed: bool,
) -> Result<report::Report> {
    let mut r = report::build(m, records.clone());
    r.grids = super::grid::write_grids(dir, m)?;
    if r.units_complete > 0 {
        super::grid::bar_chart(&r, &dir.join("chart.png"))?;
        r.bar_chart = Some("chart.png".into());
    }
    let json = serde_json::to_string_pretty(&r).expect("report serialises");
    crate::io::write_atomic(&dir.join("report.json"), json.as_bytes())?;
    crate::io::write_atomic(&dir.join("report.md"), report::markdown(&r, m).as_bytes())?;
    let page = super::html::page(&r, m, &records, dir, embed)?;
    crate::io::write_atomic(&dir.join("report.html"), page.as_bytes())?;
    if r.units_complete == 0 {
        return Err(Error::Invalid(format!(
            "{}: no unit has a score for every negative and reward yet",
            dir.display()
        )));
    }
    Ok(r)
}
