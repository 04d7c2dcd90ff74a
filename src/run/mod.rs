//! The runs reneg does, as library functions another program can drive: each takes a
//! plain-data plan (serde; the CLI builds it from flags and TOML, and writes it beside the
//! run's output) and reports what happens through [`Progress`]. The CLI parses, prints and maps
//! errors to exit codes; nothing a run decides lives there.

pub mod control;
pub mod eval;
pub mod generate;
pub mod model;
pub mod train;

/// What a run tells its caller as it goes. Every method has a default that ignores it, so a
/// caller implements what it shows; the CLI's implementation draws a bar at a terminal and
/// writes a plain line at most every 30 seconds to a log.
pub trait Progress {
    /// A stage of `total` units (each a `unit`: "training step", "sampling step") begins.
    fn begin(&mut self, _total: u64, _unit: &str) {}
    /// The position within the stage (resumed runs start past 0).
    fn position(&mut self, _done: u64) {}
    /// `n` more units done.
    fn advance(&mut self, _n: u64) {}
    /// The latest status, shown beside the position ("loss -0.42, reward 0.42").
    fn status(&mut self, _msg: &str) {}
    /// A line that stays: a file written, a validation result, a setting decided.
    fn note(&mut self, _line: &str) {}
    /// Something the caller should see that does not stop the run.
    fn warn(&mut self, _line: &str) {}
    /// The stage is over.
    fn finish(&mut self) {}
}

/// A caller that shows nothing.
pub struct Silent;

impl Progress for Silent {}
