//! `reneg mini train`: the recipe that trains the miniature world's models from scratch, in
//! order (each needs the ones before it): the tiny CLIP, the VAE, the UNet (on the CLIP text
//! tower and the VAE, both frozen), the preference reward and the independent judge. Each
//! model is written, in its owners' layout, as soon as it is trained; a rerun skips models
//! already written, so an interrupted recipe resumes at the model it was on.

pub mod clip;
pub mod judge;
pub mod reward;
pub mod unet;
pub mod vae;

use crate::{example, DataConfig, Example};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use reneg::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Dataset seeds: training data, held-out checks and the experiment's prompts never overlap.
pub const TRAIN_SEED: u64 = 1;
pub const CHECK_SEED: u64 = 2;
pub const PROMPT_SEED: u64 = 3;

/// Steps per model. `scale` multiplies them all (tests use a tiny scale to run the recipe
/// end to end).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    pub clip: usize,
    pub vae: usize,
    pub unet: usize,
    pub reward: usize,
    pub judge: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            clip: 600,
            vae: 800,
            unet: 3600,
            reward: 800,
            judge: 1000,
        }
    }
}

impl Budget {
    pub fn scaled(&self, scale: f64) -> Budget {
        let s = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        Budget {
            clip: s(self.clip),
            vae: s(self.vae),
            unet: s(self.unet),
            reward: s(self.reward),
            judge: s(self.judge),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecipeConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub budget: Budget,
    /// Retrain models that are already written.
    pub force: bool,
}

/// The folders of the miniature world under `root`.
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn pipeline(&self) -> PathBuf {
        self.root.join("pipeline")
    }
    pub fn clip(&self) -> PathBuf {
        self.root.join("clip")
    }
    pub fn reward(&self) -> PathBuf {
        self.root.join("reward")
    }
    pub fn judge(&self) -> PathBuf {
        self.root.join("judge")
    }
    pub fn prompts(&self) -> PathBuf {
        self.root.join("prompts")
    }
}

/// What one model's training measured, for `recipe.json` and the log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelReport {
    pub model: String,
    pub steps: usize,
    pub seconds: f64,
    pub final_loss: f64,
    /// Held-out checks (accuracies, reconstruction error).
    pub checks: serde_json::Map<String, serde_json::Value>,
}

/// Runs the whole recipe; returns one report per model trained in this run.
pub fn run(cfg: &RecipeConfig, device: &Device) -> Result<Vec<ModelReport>> {
    let layout = Layout::new(&cfg.out);
    mkdir(&layout.root)?;
    write_prompts(&layout)?;
    let b = &cfg.budget;
    let done = |dir: &Path, file: &str| !cfg.force && dir.join(file).is_file();
    // Two chains at a time (a tiny model's step uses about one core of two). The CLIP and
    // then the VAE beside the reward; then the UNet (on the CLIP text tower and the VAE)
    // beside the judge (calibrated on VAE round trips).
    let both = |a: &(dyn Fn() -> Result<Vec<ModelReport>> + Sync),
                b: &(dyn Fn() -> Result<Vec<ModelReport>> + Sync)|
     -> Result<Vec<ModelReport>> {
        let (ra, rb) = std::thread::scope(|s| {
            let hb = s.spawn(b);
            let ra = a();
            let rb = hb.join().unwrap_or_else(|_| {
                Err(Error::Invalid(
                    "mini train: a training thread panicked".into(),
                ))
            });
            (ra, rb)
        });
        let mut r = ra?;
        r.extend(rb?);
        Ok(r)
    };
    let clip_vae = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(&layout.clip(), "model.safetensors") {
            r.push(clip::train(&layout, cfg.seed, b.clip, device)?);
        }
        if !done(
            &layout.pipeline().join("vae"),
            "diffusion_pytorch_model.safetensors",
        ) {
            r.push(vae::train(&layout, cfg.seed, b.vae, device)?);
        }
        Ok(r)
    };
    let reward = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(&layout.reward(), "open_clip_model.safetensors") {
            r.push(reward::train(&layout, cfg.seed, b.reward, device)?);
        }
        Ok(r)
    };
    let unet = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(
            &layout.pipeline().join("unet"),
            "diffusion_pytorch_model.safetensors",
        ) {
            r.push(unet::train(&layout, cfg.seed, b.unet, device)?);
        }
        Ok(r)
    };
    let judge = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(&layout.judge(), crate::judge::WEIGHTS_FILE) {
            r.push(judge::train(&layout, cfg.seed, b.judge, device)?);
        }
        Ok(r)
    };
    let mut reports = both(&clip_vae, &reward)?;
    reports.extend(both(&unet, &judge)?);
    // Keep earlier reports of models this run skipped.
    let path = layout.root.join("recipe.json");
    let mut all: Vec<ModelReport> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for r in &reports {
        all.retain(|o| o.model != r.model);
        all.push(r.clone());
    }
    let text = serde_json::to_string_pretty(&all).map_err(|e| Error::Invalid(e.to_string()))?;
    reneg::io::write_atomic(&path, text.as_bytes())?;
    Ok(reports)
}

/// Training and held-out prompt files for ReNeg in the miniature world: clean captions of
/// distinct scenes (one caption per canonical scene) from a seed no model trained on. The
/// training prompts come only from scenes outside the held-out partition
/// ([`crate::Scene::is_heldout`]) and the held-out prompts only from inside it, so no
/// evaluation scene is a training scene under another wording.
fn write_prompts(layout: &Layout) -> Result<()> {
    mkdir(&layout.prompts())?;
    let (train, heldout) = prompt_sets();
    let text = |v: &[String]| v.join("\n") + "\n";
    reneg::io::write_atomic(&layout.prompts().join("train.txt"), text(&train).as_bytes())?;
    reneg::io::write_atomic(
        &layout.prompts().join("heldout.txt"),
        text(&heldout).as_bytes(),
    )
}

/// Prompts in ReNeg's training and held-out files.
pub const TRAIN_PROMPTS: usize = 400;
pub const HELDOUT_PROMPTS: usize = 48;

/// `(training prompts, held-out prompts)`: see [`write_prompts`].
pub fn prompt_sets() -> (Vec<String>, Vec<String>) {
    let cfg = DataConfig {
        degraded_share: 0.0,
        ..DataConfig::default()
    };
    let draw = |from: u64, n: usize, heldout: bool| -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut i = from;
        while out.len() < n {
            let e = example(PROMPT_SEED, i, &cfg);
            i += 1;
            if e.scene.is_heldout() == heldout && seen.insert(e.scene.canonical()) {
                out.push(e.caption);
            }
        }
        out
    };
    (
        draw(0, TRAIN_PROMPTS, false),
        draw(10_000, HELDOUT_PROMPTS, true),
    )
}

pub(crate) fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    reneg::io::write_atomic(path, text.as_bytes())
}

/// Examples `start..start + n` of dataset `seed` and their images as `[n, 3, s, s]` in [0, 1].
pub(crate) fn batch(
    seed: u64,
    start: u64,
    n: usize,
    cfg: &DataConfig,
    dev: &Device,
) -> Result<(Tensor, Vec<Example>)> {
    let examples: Vec<Example> = (start..start + n as u64)
        .map(|i| example(seed, i, cfg))
        .collect();
    let data: Vec<f32> = examples.iter().flat_map(|e| e.image.clone()).collect();
    let images = Tensor::from_vec(data, (n, 3, cfg.size, cfg.size), dev)?;
    Ok((images, examples))
}

/// Writes `vars` (each under the name `keep` gives it; left out where it gives none) and
/// `extra` as a float16 safetensors file, atomically. Float16 halves the committed models'
/// size; they are computed in float32 after loading.
pub(crate) fn save_vars(
    vars: &[(String, Var)],
    keep: impl Fn(&str) -> Option<String>,
    extra: HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let mut map: HashMap<String, Tensor> = extra
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    for (name, var) in vars {
        if let Some(key) = keep(name) {
            map.insert(
                key,
                var.as_tensor()
                    .detach()
                    .to_dtype(DType::F16)?
                    .contiguous()?,
            );
        }
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

/// AdamW with linear warm-up and cosine decay, a loss per step from `step_loss`; logs every
/// tenth of the run. Returns the mean loss over the last tenth.
pub(crate) fn fit(
    name: &str,
    vars: Vec<Var>,
    steps: usize,
    lr: f64,
    mut step_loss: impl FnMut(usize) -> Result<Tensor>,
) -> Result<f64> {
    let params = candle_nn::ParamsAdamW {
        lr,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vars, params)?;
    let warmup = (steps / 20).max(1);
    let start = Instant::now();
    let mut recent: Vec<f64> = Vec::new();
    let every = (steps / 10).max(1);
    for step in 0..steps {
        let f = if step < warmup {
            (step + 1) as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
            0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        };
        opt.set_learning_rate(lr * f.max(0.02));
        let loss = step_loss(step)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Invalid(format!(
                "{name}: the loss became {value} at step {step}; lower the learning rate"
            )));
        }
        opt.backward_step(&loss)?;
        recent.push(value);
        if recent.len() > every {
            recent.remove(0);
        }
        if (step + 1) % every == 0 || step + 1 == steps {
            let mean = recent.iter().sum::<f64>() / recent.len() as f64;
            eprintln!(
                "mini {name}: step {}/{steps} loss {mean:.4} ({:.0} s)",
                step + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(recent.iter().sum::<f64>() / recent.len().max(1) as f64)
}

/// Token ids of `texts` as `[n, max_len]`.
pub(crate) fn token_ids(
    tok: &reneg::tokenizer::ClipTokenizer,
    texts: &[String],
    dev: &Device,
) -> Result<Tensor> {
    let ids: Vec<u32> = texts.iter().flat_map(|t| tok.encode(t)).collect();
    Ok(Tensor::from_vec(ids, (texts.len(), tok.max_len()), dev)?)
}

/// [`token_ids`] cut after the last end token of the batch. For pooled text features this
/// changes nothing (causal attention: no token sees the padding after it) and saves most of
/// the text tower's work on short captions.
pub(crate) fn token_ids_trimmed(
    tok: &reneg::tokenizer::ClipTokenizer,
    texts: &[String],
    dev: &Device,
) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
    let eos = tok.eos_id();
    let len = rows
        .iter()
        .map(|r| r.iter().position(|&v| v == eos).map_or(r.len(), |p| p + 1))
        .max()
        .unwrap_or(1);
    let ids: Vec<u32> = rows.iter().flat_map(|r| r[..len].to_vec()).collect();
    Ok(Tensor::from_vec(ids, (texts.len(), len), dev)?)
}

pub(crate) fn vars_of(list: &[(String, Var)]) -> Vec<Var> {
    list.iter().map(|(_, v)| v.clone()).collect()
}
