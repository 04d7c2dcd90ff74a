//! The negatives `reneg eval` compares, as written on the command line.

use std::path::PathBuf;

/// The hand-written negative prompt of the ReNeg authors' inference script.
pub const HANDCRAFTED: &str = "distorted, ugly, blurry, low resolution, low quality, bad, deformed, disgusting, Overexposed, Simple background, Plain background, Grainy, Underexposed, too dark, too bright, too low contrast, too high contrast, Broken, Macabre, artifacts, oversaturated";

#[derive(Debug, Clone, PartialEq)]
pub enum NegativeSpec {
    /// The empty prompt.
    Null,
    /// [`HANDCRAFTED`].
    Handcrafted,
    Prompt(String),
    /// A negative-embedding file (ours or the official ReNeg `.bin`).
    Embedding(PathBuf),
    /// Per-sample adaptation starting from this embedding file.
    PerSample(PathBuf),
}

impl NegativeSpec {
    /// Parses `null`, `handcrafted`, `prompt:TEXT`, `per-sample:FILE` or an embedding file
    /// path; files must exist.
    pub fn parse(spec: &str) -> std::result::Result<Self, String> {
        let file = |p: &str, what: &str| {
            let path = PathBuf::from(p);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "--negative {spec}: {} not found; give an existing {what}",
                    path.display()
                ))
            }
        };
        match spec {
            "null" => Ok(Self::Null),
            "handcrafted" => Ok(Self::Handcrafted),
            s if s.starts_with("prompt:") => Ok(Self::Prompt(s["prompt:".len()..].to_string())),
            s if s.starts_with("per-sample:") => Ok(Self::PerSample(file(
                &s["per-sample:".len()..],
                "embedding file to start the adaptation from",
            )?)),
            s if std::path::Path::new(s).is_file() => Ok(Self::Embedding(PathBuf::from(s))),
            s if s.contains('/') || s.contains('.') => Err(format!(
                "--negative {s}: file not found; give an existing embedding file"
            )),
            s => Err(format!(
                "--negative {s}: unknown negative; use null, handcrafted, prompt:TEXT, per-sample:FILE or an embedding file"
            )),
        }
    }

    /// The text to encode, for the prompt-like negatives.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Null => Some(""),
            Self::Handcrafted => Some(HANDCRAFTED),
            Self::Prompt(t) => Some(t),
            _ => None,
        }
    }
}
