//! What every chart shares: the font its text is drawn with (DejaVu Sans, shipped in
//! `assets/fonts` under its licence and embedded in the binary, so charts look the same on
//! every machine and need no system fonts) and the atomic PNG write.

use crate::error::{Error, Result};
use plotters::style::{FontStyle, IntoFont, TextStyle};
use std::path::Path;
use std::sync::Once;

/// The font family name charts use; registered on first use.
pub const FAMILY: &str = "sans-serif";
const DEJAVU_SANS: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are the committed font file; a failure here is a build defect.
        plotters::style::register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS)
            .unwrap_or_else(|_| panic!("assets/fonts/DejaVuSans.ttf is not a font"));
    });
}

/// Text of `size` pixels in the charts' font.
pub fn text(size: f64) -> TextStyle<'static> {
    register();
    (FAMILY, size).into_font().into()
}

/// Draws into a temporary PNG beside `out` with `draw`, then renames it to `out`, so a chart
/// is whole or absent.
pub fn write_png(out: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    register();
    let tmp = out.with_extension("tmp.png");
    draw(&tmp)?;
    std::fs::rename(&tmp, out).map_err(|e| Error::file(out, format!("cannot write: {e}")))
}

/// A label of at most `max` characters (an ellipsis marks the cut).
pub fn shorten(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_string()
    } else {
        let cut: String = label.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}
