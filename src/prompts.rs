//! Prompt lists: `.txt` (one per line), `.tsv` with a `Prompt` column (PartiPrompts; a
//! `Category` column is kept, and a `Control_Image` column gives each prompt a ControlNet
//! conditioning image), `.json` (a list of strings, or `{style: [prompts]}` as the HPSv2
//! benchmark), `.jsonl` (`{"prompt", "category", "control_image"}` per line). Control-image
//! paths are relative to the prompt file. An empty list is an error.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prompt {
    pub text: String,
    /// PartiPrompts' category or the HPSv2 style, when the file has one.
    pub category: Option<String>,
    /// The prompt's own ControlNet conditioning image, when the file gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_image: Option<PathBuf>,
}

pub fn load(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, "prompt file not found"),
        _ => Error::file(path, format!("cannot read: {e}")),
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_lowercase();
    let prompts = match ext.as_str() {
        "tsv" => parse_tsv(&text, path)?,
        "json" => parse_json(&text, path)?,
        "jsonl" => parse_jsonl(&text, path)?,
        _ => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| Prompt {
                text: l.to_string(),
                ..Prompt::default()
            })
            .collect(),
    };
    if prompts.is_empty() {
        return Err(Error::file(path, "contains no prompts; add at least one"));
    }
    Ok(prompts)
}

fn parse_tsv(text: &str, path: &Path) -> Result<Vec<Prompt>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let p = col("prompt").ok_or_else(|| {
        Error::file(
            path,
            "a .tsv prompt file needs a header with a `Prompt` column",
        )
    })?;
    let c = col("category");
    let ci = col("control_image");
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            let text = fields.get(p)?.trim();
            (!text.is_empty()).then(|| Prompt {
                text: text.to_string(),
                category: c.and_then(|c| fields.get(c)).map(|s| s.trim().to_string()),
                control_image: ci
                    .and_then(|c| fields.get(c))
                    .map(|s| s.trim())
                    .filter(|s| !s.is_empty())
                    .map(|s| relative_to(path, s)),
            })
        })
        .collect())
}

/// A path written in the prompt file `file`, relative to its folder.
fn relative_to(file: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new("")).join(p)
    }
}

fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Prompt>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        prompt: String,
        #[serde(default)]
        category: Option<String>,
        #[serde(default)]
        control_image: Option<String>,
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line: Line = serde_json::from_str(l).map_err(|e| {
                Error::file(
                    path,
                    format!(
                        "line {}: {e}; each line is {{\"prompt\": ..., \"category\": ..., \"control_image\": ...}}",
                        i + 1
                    ),
                )
            })?;
            Ok(Prompt {
                text: line.prompt,
                category: line.category,
                control_image: line.control_image.map(|c| relative_to(path, &c)),
            })
        })
        .collect()
}

fn parse_json(text: &str, path: &Path) -> Result<Vec<Prompt>> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let strings = |v: &serde_json::Value, cat: Option<&str>| -> Option<Vec<Prompt>> {
        v.as_array()?
            .iter()
            .map(|p| {
                Some(Prompt {
                    text: p.as_str()?.to_string(),
                    category: cat.map(String::from),
                    control_image: None,
                })
            })
            .collect()
    };
    let bad = || {
        Error::file(
            path,
            "a .json prompt file is a list of strings, or an object of lists of strings",
        )
    };
    match &v {
        serde_json::Value::Array(_) => strings(&v, None).ok_or_else(bad),
        serde_json::Value::Object(map) => {
            let mut out = vec![];
            for (style, list) in map {
                out.extend(strings(list, Some(style)).ok_or_else(bad)?);
            }
            Ok(out)
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Control images come from a `.tsv` column or `.jsonl` key, relative to the prompt file
    /// (absolute paths kept); a prompt without one has none; unknown `.jsonl` keys are refused.
    #[test]
    fn control_images_are_read_relative_to_the_prompt_file() {
        let dir = std::env::temp_dir().join(format!("reneg-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tsv = write(
            &dir,
            "p.tsv",
            "Prompt\tCategory\tControl_Image\na cat\tAnimals\tedges/cat.png\na dog\tAnimals\t\na cube\t\t/abs/cube.png\n",
        );
        let got = load(&tsv).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].control_image, Some(dir.join("edges/cat.png")));
        assert_eq!(got[0].category.as_deref(), Some("Animals"));
        assert_eq!(got[1].control_image, None);
        assert_eq!(got[2].control_image, Some(PathBuf::from("/abs/cube.png")));
        let jsonl = write(
            &dir,
            "p.jsonl",
            "{\"prompt\": \"a cat\", \"control_image\": \"c.png\"}\n\n{\"prompt\": \"a dog\", \"category\": \"Animals\"}\n",
        );
        let got = load(&jsonl).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].control_image, Some(dir.join("c.png")));
        assert_eq!(
            (got[1].text.as_str(), got[1].control_image.as_ref()),
            ("a dog", None)
        );
        let bad = write(
            &dir,
            "bad.jsonl",
            "{\"prompt\": \"x\", \"control\": \"c.png\"}\n",
        );
        let err = load(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl") && err.contains("line 1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
