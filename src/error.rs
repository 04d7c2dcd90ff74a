//! The library's one error type. Every variant that stems from user input names the file or
//! argument and says what to do, so the binary can print it on one line and exit with code 2.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder that is missing, unreadable or corrupt.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A config value this implementation does not support; never silently ignored.
    #[error("{}: unsupported config `{key}` = {value}: {hint}", file.display())]
    UnsupportedConfig {
        file: PathBuf,
        key: String,
        value: String,
        hint: String,
    },

    /// A tensor missing from a checkpoint, or of the wrong shape.
    #[error("{}: tensor `{name}` {problem}", file.display())]
    Weight {
        file: PathBuf,
        name: String,
        problem: String,
    },

    /// An option the model's family has no place for (`what`: "textual inversions", ...).
    /// [`crate::Pipeline`] names the model in it.
    #[error("{what} do not apply to this model family")]
    NotInFamily { what: String },

    /// A bad argument or input value (shapes, empty prompt lists, ...).
    #[error("{0}")]
    Invalid(String),

    /// An internal tensor error: a bug, not bad input. Not a `source`, so the message
    /// is printed once.
    #[error("tensor error: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn unsupported(
        file: impl AsRef<Path>,
        key: &str,
        value: impl std::fmt::Display,
        hint: &str,
    ) -> Self {
        Error::UnsupportedConfig {
            file: file.as_ref().to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            hint: hint.to_string(),
        }
    }

    /// True when the error was caused by the user's input (exit code 2), not by a bug.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Candle(_))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .or_else(|e| serde_json::from_str(&python_literals_as_null(&text)).map_err(|_| e))
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// Python's `json.dump` writes `Infinity`, `-Infinity` and `NaN`, which JSON does not have
/// (diffusers saves `"lambda_min_clipped": -Infinity` in DPM-Solver configs). They become
/// `null` here, which every config reader takes as "the default"; strings are left alone.
pub fn python_literals_as_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                let n = rest.chars().take(2).map(char::len_utf8).sum();
                out.push_str(&rest[..n]);
                rest = &rest[n..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if let Some(lit) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|l| rest.starts_with(l))
        {
            out.push_str("null");
            rest = &rest[lit.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}
