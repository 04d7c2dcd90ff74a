//! A long run's progress, for a person at a terminal and for a log.
//!
//! At a terminal (stderr is one) an indicatif bar shows the position, the latest message and
//! the time left. When stdout is not a terminal (a log file, a Slurm job, `cmd > log`), a
//! plain line goes to stdout at most every 30 seconds with the position, the latest message
//! and the time left, so a redirected run is never silent for its whole length
//! (`RENEG_PROGRESS_SECONDS` sets the interval; 0 writes a line at every update). Lines meant
//! to stay ([`Progress::println`]) go to stdout in both cases: indicatif drops its own
//! `println` when its bar is hidden.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The seconds between two plain lines unless `RENEG_PROGRESS_SECONDS` says otherwise.
const LOG_EVERY: Duration = Duration::from_secs(30);

pub struct Progress {
    bar: ProgressBar,
    log: Option<Mutex<Log>>,
}

/// The plain-line side: what is counted, and when the last line was written.
struct Log {
    what: String,
    every: Duration,
    start: Instant,
    last_line: Instant,
    /// The first update seen (position, time): the rate is measured from it, so a resumed
    /// run's earlier steps do not count as done in no time.
    anchor: Option<(u64, Instant)>,
    pos: u64,
    len: u64,
    msg: String,
}

impl Progress {
    /// A bar of `len` units in indicatif's `template`; `what` names a unit in the log lines
    /// ("training step", "image").
    pub fn new(len: u64, template: &str, what: &'static str) -> Self {
        let bar = ProgressBar::new(len);
        bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
        let log = (!std::io::stdout().is_terminal()).then(|| {
            let now = Instant::now();
            Mutex::new(Log {
                what: what.to_string(),
                every: log_every(),
                start: now,
                last_line: now,
                anchor: None,
                pos: 0,
                len,
                msg: String::new(),
            })
        });
        Self { bar, log }
    }

    /// A new length and unit (a library run's stage).
    pub fn set_length(&self, len: u64, what: &str) {
        self.bar.set_length(len);
        // Not an update: the rate is measured from the first position reported.
        if let Some(Ok(mut l)) = self.log.as_ref().map(|l| l.lock()) {
            l.len = len;
            l.what = what.to_string();
        }
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.update(|l| l.pos = pos);
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.update(|l| l.pos += n);
    }

    /// The latest message (shown beside the position; the log's next line carries it).
    pub fn set_message(&self, msg: String) {
        if let Some(log) = &self.log {
            if let Ok(mut l) = log.lock() {
                l.msg.clone_from(&msg);
            }
        }
        self.bar.set_message(msg);
    }

    /// A line that stays (on stdout, above the bar at a terminal).
    pub fn println(&self, line: impl AsRef<str>) {
        self.bar.suspend(|| println!("{}", line.as_ref()));
    }

    /// Runs `f` with the bar cleared (for output of its own).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }

    fn update(&self, change: impl FnOnce(&mut Log)) {
        let Some(log) = &self.log else {
            return;
        };
        let Ok(mut l) = log.lock() else {
            return;
        };
        change(&mut l);
        let now = Instant::now();
        if l.anchor.is_none() {
            l.anchor = Some((l.pos, now));
        }
        if now.duration_since(l.last_line) < l.every {
            return;
        }
        l.last_line = now;
        let line = l.line(now);
        self.bar.suspend(|| println!("{line}"));
    }
}

/// How a library run's progress shows: the bar (or log lines) and lines that stay on stdout;
/// warnings on stderr.
impl reneg::run::Progress for Progress {
    fn begin(&mut self, total: u64, unit: &str) {
        self.set_length(total, unit);
    }
    fn position(&mut self, done: u64) {
        self.set_position(done);
    }
    fn advance(&mut self, n: u64) {
        self.inc(n);
    }
    fn status(&mut self, msg: &str) {
        self.set_message(msg.to_string());
    }
    fn note(&mut self, line: &str) {
        self.println(line);
    }
    fn warn(&mut self, line: &str) {
        self.suspend(|| eprintln!("warning: {line}"));
    }
    fn finish(&mut self) {
        self.finish_and_clear();
    }
}

impl Log {
    /// "training step 12/400 (reward 0.4312): 3m20s so far, about 1h02m left".
    fn line(&self, now: Instant) -> String {
        let left = match self.anchor {
            Some((p0, t0)) if self.pos > p0 => {
                let per = now.duration_since(t0).as_secs_f64() / (self.pos - p0) as f64;
                format!(
                    "about {} left",
                    clock(per * self.len.saturating_sub(self.pos) as f64)
                )
            }
            _ => "time left not known yet".into(),
        };
        let msg = if self.msg.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.msg)
        };
        format!(
            "{} {}/{}{msg}: {} so far, {left}",
            self.what,
            self.pos,
            self.len,
            clock(now.duration_since(self.start).as_secs_f64())
        )
    }
}

fn log_every() -> Duration {
    std::env::var("RENEG_PROGRESS_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(LOG_EVERY, Duration::from_secs_f64)
}

/// Seconds as "45s", "3m20s" or "1h02m".
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_as_a_person_would() {
        assert_eq!(clock(44.6), "45s");
        assert_eq!(clock(200.0), "3m20s");
        assert_eq!(clock(3720.0), "1h02m");
    }

    #[test]
    fn time_left_is_measured_from_the_first_update() {
        let t0 = Instant::now();
        let l = Log {
            what: "training step".into(),
            every: Duration::ZERO,
            start: t0,
            last_line: t0,
            // A run resumed at step 100: its first update came 10 s after the start.
            anchor: Some((101, t0 + Duration::from_secs(10))),
            pos: 111,
            len: 200,
            msg: "loss -0.5000, reward 0.5000".into(),
        };
        // Ten steps in 20 s since the anchor: 2 s a step, 89 steps left.
        let line = l.line(t0 + Duration::from_secs(30));
        assert_eq!(
            line,
            "training step 111/200 (loss -0.5000, reward 0.5000): 30s so far, about 2m58s left"
        );
    }
}
