//! Side-by-side evaluation of negatives (`reneg eval`): what a run is (its [`Manifest`]),
//! what it records (one [`Record`] per image and reward, in `results.jsonl`), and the report
//! built from those records. The run loop itself lives in the CLI; everything here is pure
//! bookkeeping, so a merged set of shards and an unsharded run give the same report.

pub mod grid;
pub mod html;
pub mod negative;
pub mod output;
pub mod report;
pub mod stats;

use crate::error::{Error, Result};
use crate::prompts::Prompt;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use negative::{NegativeSpec, HANDCRAFTED};

/// Everything that determines a run's images and scores. A rerun or a merge must agree on it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub model: String,
    pub prompts: Vec<Prompt>,
    /// Seeds per prompt: `base_seed .. base_seed + seeds`, the same for every prompt.
    pub seeds: usize,
    pub base_seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub height: usize,
    pub width: usize,
    /// The negatives as given on the command line, in order; the first is the baseline.
    pub negatives: Vec<String>,
    /// Reward names, in order.
    pub rewards: Vec<String>,
    /// Per-sample adaptation settings (steps, patience, lr), when a per-sample negative is used.
    pub adapt: Option<(usize, usize, f64)>,
    /// What each reward is to the negatives compared (reward name -> a sentence): which
    /// negatives were trained or adapted on it, or that it only evaluates. The report states
    /// it under each reward, so an optimised score is never read as an independent one.
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, String>,
    /// What else shapes the model's images ("lora=FILE:0.7", "embedding=NAME=FILE",
    /// "vae=DIR", "clip_skip=1", "prompt_syntax=a1111"), so that resuming with other files
    /// or settings is refused as other negatives or prompts are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_options: Vec<String>,
    /// Frames per clip of a text-to-video model (its "images" are clips, scored per frame and
    /// averaged, with [`TEMPORAL_CONSISTENCY`] among the rewards); None for images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<usize>,
    /// The models' numeric precision (f32, tf32, bf16, fp16) and the device kind (cpu, cuda):
    /// both change an image's bits. Manifests written before they were recorded read as f32
    /// on the CPU, the only setting those runs could have used by default.
    #[serde(default = "default_precision")]
    pub precision: String,
    #[serde(default = "default_device")]
    pub device: String,
    /// The sampler that ran, as it labels itself (the model's own unless `--scheduler` chose
    /// one; DDIM's eta included).
    #[serde(default)]
    pub sampler: String,
    /// Every file besides the model that shapes the images or the scores (reward models, the
    /// negatives' embedding files, LoRAs, textual inversions, a VAE, ControlNets, control
    /// images), with its content hash: the same path holding other content is another run.
    #[serde(default)]
    pub files: Vec<FileStamp>,
}

fn default_precision() -> String {
    "f32".into()
}

fn default_device() -> String {
    "cpu".into()
}

/// A file (or folder) a run read, by path and [`crate::io::content_hash`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    /// What the run used it as ("reward model", "negative", "lora", ...).
    pub role: String,
    pub path: String,
    pub sha256: String,
}

impl FileStamp {
    /// Stamps `path` (a file or a folder) with its content hash; a path that is not on disk
    /// (a hub repo id) is recorded by name alone.
    pub fn of(role: &str, path: &Path) -> Result<Self> {
        let sha256 = if path.exists() {
            crate::io::content_hash(path)?
        } else {
            String::new()
        };
        Ok(Self {
            role: role.into(),
            path: path.display().to_string(),
            sha256,
        })
    }
}

/// The name under which a video evaluation records each clip's temporal consistency
/// ([`crate::reward::temporal_consistency`]) beside the rewards.
pub const TEMPORAL_CONSISTENCY: &str = "temporal-consistency";

/// What each reward is to the negatives compared ([`Manifest::roles`]). `rewards`: each
/// reward's name and whether it is evaluation-only; `trained_on[j]`: the rewards negative
/// `j`'s embedding was trained on (from its metadata; empty for prompts).
pub fn reward_roles(
    negatives: &[String],
    specs: &[negative::NegativeSpec],
    trained_on: &[Vec<String>],
    rewards: &[(String, bool)],
) -> std::collections::BTreeMap<String, String> {
    use negative::NegativeSpec;
    rewards
        .iter()
        .map(|(name, evaluation_only)| {
            let role = if *evaluation_only {
                "Independent: an evaluation-only score; no negative here was trained or adapted on it."
                    .to_string()
            } else {
                let mut by: Vec<String> = Vec::new();
                for (j, spec) in specs.iter().enumerate() {
                    let neg = &negatives[j];
                    if trained_on.get(j).is_some_and(|t| t.contains(name)) {
                        by.push(format!("`{neg}` starts from an embedding trained on it (on the training prompts)"));
                    }
                    if matches!(spec, NegativeSpec::PerSample(_)) {
                        by.push(format!("`{neg}` adapts on it, on the very image it scores here"));
                    }
                }
                if by.is_empty() {
                    "Not optimised by any negative compared here.".to_string()
                } else {
                    format!("Optimised: {}.", by.join("; "))
                }
            };
            (name.clone(), role)
        })
        .collect()
}

/// The file a run's manifest is kept in.
pub const MANIFEST: &str = "eval.json";
pub const RESULTS: &str = "results.jsonl";

impl Manifest {
    /// Units (prompt index, seed), in order.
    pub fn units(&self) -> Vec<(usize, u64)> {
        (0..self.prompts.len())
            .flat_map(|p| (0..self.seeds as u64).map(move |k| (p, self.base_seed + k)))
            .collect()
    }

    /// The image of `negative` on unit (`prompt`, `seed`), relative to the output folder.
    pub fn image_path(negative: usize, prompt: usize, seed: u64) -> PathBuf {
        PathBuf::from(format!("images/n{negative:02}/{prompt:05}-seed{seed}.png"))
    }

    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                Error::file(
                    &path,
                    format!("not an eval manifest ({e}); use another --out"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::file(&path, format!("cannot read: {e}"))),
        }
    }

    /// What differs between two manifests, in words ("precision f32 -> fp16", "the content of
    /// reward model r/ changed"); empty when they describe the same run.
    pub fn differences(&self, other: &Manifest) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).expect("manifest serialises"),
            serde_json::to_value(other).expect("manifest serialises"),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec![];
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let short = |v: Option<&serde_json::Value>| -> String {
            let text = v.map_or("(none)".to_string(), |v| v.to_string());
            if text.chars().count() > 60 {
                format!("{}...", text.chars().take(57).collect::<String>())
            } else {
                text
            }
        };
        let mut out = vec![];
        for k in keys {
            if a.get(k) == b.get(k) {
                continue;
            }
            if k == "files" {
                for f in &other.files {
                    match self
                        .files
                        .iter()
                        .find(|g| g.role == f.role && g.path == f.path)
                    {
                        Some(g) if g.sha256 != f.sha256 => {
                            out.push(format!("the content of {} {} changed", f.role, f.path))
                        }
                        Some(_) => {}
                        None => out.push(format!("{} {} was not used before", f.role, f.path)),
                    }
                }
                for g in &self.files {
                    if !other
                        .files
                        .iter()
                        .any(|f| f.role == g.role && f.path == g.path)
                    {
                        out.push(format!("{} {} is no longer used", g.role, g.path));
                    }
                }
                continue;
            }
            out.push(format!("{k} {} -> {}", short(a.get(k)), short(b.get(k))));
        }
        out
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        crate::io::write_atomic(&dir.join(MANIFEST), json.as_bytes())
    }
}

/// `--shard i/n`: this process does the units whose index is `i` modulo `n` (0-based `i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(spec: &str) -> std::result::Result<Shard, String> {
        let bad = || format!("--shard {spec}: expected i/n with 0 <= i < n, e.g. 0/4");
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    pub fn owns(&self, unit_index: usize) -> bool {
        unit_index % self.count == self.index
    }
}

/// One image's score under one reward: a line of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub prompt_index: usize,
    pub seed: u64,
    pub negative: usize,
    pub negative_label: String,
    pub reward: String,
    /// A non-finite score (a reward that returned NaN) is kept as `null` and read back as NaN:
    /// reports count it, resume and merge read it.
    #[serde(with = "nan_as_null")]
    pub score: f64,
    pub image: String,
    pub prompt: String,
    pub category: Option<String>,
}

impl Record {
    pub fn key(&self) -> (usize, u64, usize, String) {
        (
            self.prompt_index,
            self.seed,
            self.negative,
            self.reward.clone(),
        )
    }
}

/// Reads `results.jsonl` of `dir`. A last line cut short by an interruption is dropped (and
/// cut from the file, so appending stays valid); any other bad line is an error, and so is a
/// record whose image path is not the one its (negative, prompt, seed) names: merge and the
/// report read and write those paths under their folders, so an edited `../` or absolute path
/// must never reach them.
pub fn load_records(dir: &Path) -> Result<Vec<Record>> {
    let path = dir.join(RESULTS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::file(&path, format!("cannot read: {e}"))),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    if complete.len() != text.len() {
        crate::io::write_atomic(&path, complete.as_bytes())?;
    }
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let r: Record = serde_json::from_str(l).map_err(|e| {
                Error::file(&path, format!("line {}: not a result record ({e})", i + 1))
            })?;
            let want = Manifest::image_path(r.negative, r.prompt_index, r.seed);
            if Path::new(&r.image) != want {
                return Err(Error::file(
                    &path,
                    format!(
                        "line {}: image {:?} is not this record's image ({}); the file was edited or is not from reneg eval",
                        i + 1,
                        r.image,
                        want.display()
                    ),
                ));
            }
            Ok(r)
        })
        .collect()
}

/// Appends records to `results.jsonl`, one flushed line each.
pub fn append_records(dir: &Path, records: &[Record]) -> Result<()> {
    let path = dir.join(RESULTS);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("record serialises"));
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| Error::file(&path, format!("cannot write: {e}")))
}

/// Records keyed (prompt, seed, negative, reward), later duplicates winning: the canonical,
/// order-independent form a report is built from.
pub fn dedup(records: Vec<Record>) -> BTreeMap<(usize, u64, usize, String), Record> {
    records.into_iter().map(|r| (r.key(), r)).collect()
}

/// JSON has no NaN or infinity: non-finite scores are written as `null` and read back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}
