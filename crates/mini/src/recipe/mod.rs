//! `reneg mini train`: the recipe that trains the miniature world's models from scratch, in
//! order (each needs the ones before it): the tiny CLIP, the VAE, the UNet (on the CLIP text
//! tower and the VAE, both frozen), the preference reward and the independent judge, and a
//! ControlNet on the UNet (conditioned on the scenes' shape masks, for the transfer
//! experiment). Each
//! model is written, in its owners' layout, as soon as it is trained; a rerun skips models
//! already written, so an interrupted recipe resumes at the model it was on.

pub mod clip;
pub mod controlnet;
pub mod joint;
pub mod judge;
pub mod reward;
pub mod unet;
pub mod vae;

use crate::{example, DataConfig, Example};
use candle_core::{DType, Device, Tensor, Var};
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
    #[serde(default = "default_controlnet_steps")]
    pub controlnet: usize,
    /// The fine-tune of the base UNet and the text encoder together, on zero terminal SNR
    /// with v-prediction ([`joint`]; the fourth world's); 0 leaves it out, as the third
    /// world did: the UNet trained on the CLIP's frozen text tower is the pipeline's.
    #[serde(default)]
    pub joint: usize,
}

fn default_controlnet_steps() -> usize {
    2000
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            clip: 600,
            vae: 800,
            unet: 10_800,
            reward: 800,
            judge: 1000,
            controlnet: default_controlnet_steps(),
            joint: 2000,
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
            controlnet: s(self.controlnet),
            // A stage left out stays out.
            joint: if self.joint == 0 { 0 } else { s(self.joint) },
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
    /// The base UNet (on the CLIP's frozen text tower), which the joint fine-tune starts
    /// from when the recipe has one; not part of the pipeline.
    pub fn unet_base(&self) -> PathBuf {
        self.root.join("unet-base")
    }
    pub fn controlnet(&self) -> PathBuf {
        self.root.join("controlnet")
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
    if cfg.force {
        // Retraining from scratch: unfinished state of an earlier run is not resumed.
        for m in [
            "clip",
            "vae",
            "reward",
            "unet",
            "joint",
            "judge",
            "controlnet",
        ] {
            remove_checkpoint(&layout, m)?;
        }
    }
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
            remove_checkpoint(&layout, "clip")?;
        }
        if !done(
            &layout.pipeline().join("vae"),
            "diffusion_pytorch_model.safetensors",
        ) {
            r.push(vae::train(&layout, cfg.seed, b.vae, device)?);
            remove_checkpoint(&layout, "vae")?;
        }
        Ok(r)
    };
    let reward = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(&layout.reward(), "open_clip_model.safetensors") {
            r.push(reward::train(&layout, cfg.seed, b.reward, device)?);
            remove_checkpoint(&layout, "reward")?;
        }
        Ok(r)
    };
    let unet = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        let weights = "diffusion_pytorch_model.safetensors";
        let final_unet = done(&layout.pipeline().join("unet"), weights);
        // With a joint stage the UNet is only its starting point (`unet-base/`), not needed
        // once the pipeline's exists; without one it is the pipeline's.
        let joint = b.joint > 0;
        let unet_dir = if joint {
            layout.unet_base()
        } else {
            layout.pipeline().join("unet")
        };
        if !final_unet && !done(&unet_dir, weights) {
            r.push(unet::train(&layout, &unet_dir, cfg.seed, b.unet, device)?);
            remove_checkpoint(&layout, "unet")?;
        }
        if !final_unet && joint {
            r.push(joint::train(&layout, cfg.seed, b.joint, device)?);
            remove_checkpoint(&layout, "joint")?;
        }
        Ok(r)
    };
    let judge = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(&layout.judge(), crate::judge::WEIGHTS_FILE) {
            r.push(judge::train(&layout, cfg.seed, b.judge, device)?);
            remove_checkpoint(&layout, "judge")?;
        }
        Ok(r)
    };
    let controlnet = || -> Result<Vec<ModelReport>> {
        let mut r = Vec::new();
        if !done(&layout.controlnet(), "diffusion_pytorch_model.safetensors") {
            r.push(controlnet::train(&layout, cfg.seed, b.controlnet, device)?);
            remove_checkpoint(&layout, "controlnet")?;
        }
        Ok(r)
    };
    // Each phase's reports are recorded as soon as it ends, so a run interrupted in a later
    // phase (the ControlNet, after hours of UNet) keeps them; a resumed run skips those models.
    let mut reports = both(&clip_vae, &reward)?;
    record(&layout, &reports)?;
    reports.extend(both(&unet, &judge)?);
    record(&layout, &reports)?;
    // On the trained UNet.
    reports.extend(controlnet()?);
    record(&layout, &reports)?;
    Ok(reports)
}

/// Writes `reports` into `recipe.json`, keeping the entries of models they do not name
/// (trained by earlier runs).
fn record(layout: &Layout, reports: &[ModelReport]) -> Result<()> {
    let path = layout.root.join("recipe.json");
    let mut all: Vec<ModelReport> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for r in reports {
        all.retain(|o| o.model != r.model);
        all.push(r.clone());
    }
    let text = serde_json::to_string_pretty(&all).map_err(|e| Error::Invalid(e.to_string()))?;
    reneg::io::write_atomic(&path, text.as_bytes())
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
    )?;
    write_control_prompts(layout, &heldout)
}

/// The held-out prompts with their scenes' shape masks, for evaluating through the world's
/// ControlNet: `prompts/heldout-control.jsonl` (`{"prompt", "control_image"}` lines, the
/// images relative to it) and `prompts/masks/NNN.png` at the world's image size.
fn write_control_prompts(layout: &Layout, heldout: &[String]) -> Result<()> {
    let dir = layout.prompts().join(CONTROL_MASKS);
    mkdir(&dir)?;
    let size = DataConfig::default().size;
    let mut lines = String::new();
    for (i, caption) in heldout.iter().enumerate() {
        let scene = crate::Scene::parse(caption).ok_or_else(|| {
            Error::Invalid(format!(
                "held-out prompt {i} is not a scene caption: {caption}"
            ))
        })?;
        let mask = scene.mask(size);
        let plane = size * size;
        let data: Vec<u8> = (0..plane)
            .flat_map(|p| (0..3).map(move |c| (p, c)))
            .map(|(p, c)| (mask[c * plane + p] * 255.0).round() as u8)
            .collect();
        let name = format!("{CONTROL_MASKS}/{i:03}.png");
        let rgb = reneg::io::Rgb {
            width: size,
            height: size,
            data,
        };
        reneg::io::write_png(&rgb, &layout.prompts().join(&name), None)?;
        lines.push_str(&serde_json::json!({"prompt": caption, "control_image": name}).to_string());
        lines.push('\n');
    }
    reneg::io::write_atomic(&layout.prompts().join(CONTROL_PROMPTS), lines.as_bytes())
}

/// The held-out prompts with control images, and the folder of their masks (under prompts/).
pub const CONTROL_PROMPTS: &str = "heldout-control.jsonl";
pub const CONTROL_MASKS: &str = "masks";

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

/// How often (in steps) an unfinished model's state is written: a long model (the UNet runs
/// for hours on two cores) loses at most this much work to an interruption.
const CHECKPOINT_EVERY: usize = 100;

/// AdamW with linear warm-up and cosine decay, a loss per step from `step_loss`; logs every
/// tenth of the run. Returns the mean loss over the last tenth.
///
/// Every [`CHECKPOINT_EVERY`] steps the parameters, the optimiser's moments, the step and the
/// recent losses are written atomically to `checkpoint`; a rerun that finds the file resumes
/// from it, and the file is removed once the model is done. `step_loss` must depend only on
/// the step (no state carried between steps), so a resumed run computes what an uninterrupted
/// one would.
pub(crate) fn fit(
    name: &str,
    named: Vec<(String, Var)>,
    steps: usize,
    lr: f64,
    checkpoint: &Path,
    mut step_loss: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Fitted> {
    use reneg::train::optim::{AdamW, AdamWConfig};
    let (names, vars): (Vec<String>, Vec<Var>) = named.into_iter().unzip();
    let cfg = AdamWConfig {
        lr,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut states: Vec<AdamW> = vars
        .iter()
        .map(|v| AdamW::new(cfg.clone(), v.as_tensor()))
        .collect::<Result<_>>()?;
    let mut recent: Vec<f64> = Vec::new();
    let mut earlier = 0.0;
    let first = if checkpoint.is_file() {
        let r = restore(checkpoint, &names, &vars, &mut states, steps)?;
        eprintln!(
            "mini {name}: resuming at step {}/{steps} from {}",
            r.step,
            checkpoint.display()
        );
        recent = r.recent;
        earlier = r.seconds;
        r.step
    } else {
        0
    };
    let warmup = (steps / 20).max(1);
    let start = Instant::now();
    let every = (steps / 10).max(1);
    for step in first..steps {
        let f = if step < warmup {
            (step + 1) as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
            0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        };
        let loss = step_loss(step)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Invalid(format!(
                "{name}: the loss became {value} at step {step}; lower the learning rate"
            )));
        }
        let grads = loss.backward()?;
        for (var, st) in vars.iter().zip(states.iter_mut()) {
            if let Some(g) = grads.get(var) {
                let next = st.update(var.as_tensor(), g, lr * f.max(0.02))?;
                var.set(&next)?;
            }
        }
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
        if (step + 1) % CHECKPOINT_EVERY == 0 && step + 1 < steps {
            let seconds = earlier + start.elapsed().as_secs_f64();
            let state = Resumable {
                step: step + 1,
                recent: recent.clone(),
                seconds,
            };
            save_checkpoint(checkpoint, &state, &names, &vars, &states)?;
        }
    }
    Ok(Fitted {
        final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        earlier_seconds: earlier,
    })
}

/// What [`fit`] ends with.
#[derive(Debug)]
pub(crate) struct Fitted {
    /// The mean loss of the last tenth of the steps.
    pub final_loss: f64,
    /// Seconds that earlier, interrupted runs spent up to the checkpoint this run resumed
    /// from (0 for an uninterrupted run): a model's report adds them to this run's time, so
    /// `recipe.json` gives a model's whole training time and not its last run's.
    pub earlier_seconds: f64,
}

/// A checkpoint's position in a run: the step to continue from, the recent losses, and the
/// seconds spent training up to it (over all runs so far).
struct Resumable {
    step: usize,
    recent: Vec<f64>,
    seconds: f64,
}

/// Removes model `name`'s checkpoint once the model itself is written.
fn remove_checkpoint(layout: &Layout, name: &str) -> Result<()> {
    let path = checkpoint_path(layout, name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::file(&path, format!("cannot remove: {e}")))
        }
        _ => Ok(()),
    }
}

/// The checkpoint file of model `name` under the recipe's output folder.
pub(crate) fn checkpoint_path(layout: &Layout, name: &str) -> PathBuf {
    layout.root.join(format!(".{name}.partial.safetensors"))
}

/// Writes the state under each tensor's name (`param.NAME`, `m.NAME`, `v.NAME`,
/// `step.NAME`), so a resume never depends on the order a model creates its tensors in.
fn save_checkpoint(
    path: &Path,
    at: &Resumable,
    names: &[String],
    vars: &[Var],
    states: &[AdamWState],
) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for ((n, v), st) in names.iter().zip(vars).zip(states) {
        map.insert(format!("param.{n}"), v.as_tensor().detach());
        map.insert(format!("m.{n}"), st.m.clone());
        map.insert(format!("v.{n}"), st.v.clone());
        map.insert(
            format!("step.{n}"),
            Tensor::new(&[st.step as i64], &Device::Cpu)?,
        );
    }
    map.insert("step".into(), Tensor::new(&[at.step as i64], &Device::Cpu)?);
    map.insert(
        "recent_losses".into(),
        Tensor::from_vec(at.recent.clone(), at.recent.len(), &Device::Cpu)?,
    );
    map.insert("seconds".into(), Tensor::new(&[at.seconds], &Device::Cpu)?);
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

type AdamWState = reneg::train::optim::AdamW;

/// Loads a checkpoint written by [`save_checkpoint`] into `vars` and `states`; returns where
/// the run stood. Refuses a file for another model or run.
fn restore(
    path: &Path,
    names: &[String],
    vars: &[Var],
    states: &mut [AdamWState],
    steps: usize,
) -> Result<Resumable> {
    let bad = |why: String| {
        Error::file(
            path,
            format!("{why}; it is not this model's checkpoint, delete it to start over"),
        )
    };
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("cannot read it ({e})")))?;
    let get = |k: &str| map.get(k).ok_or_else(|| bad(format!("it has no `{k}`")));
    let step = get("step")?.to_vec1::<i64>()?[0] as usize;
    if step >= steps {
        return Err(bad(format!("it is at step {step} of a {steps}-step run")));
    }
    let held = map.keys().filter(|k| k.starts_with("param.")).count();
    if held != vars.len() {
        return Err(bad(format!(
            "it holds {held} tensors, the model {}",
            vars.len()
        )));
    }
    for ((n, v), st) in names.iter().zip(vars).zip(states.iter_mut()) {
        let p = get(&format!("param.{n}"))?;
        if p.dims() != v.dims() {
            return Err(bad(format!(
                "{n} has shape {:?}, not {:?}",
                p.dims(),
                v.dims()
            )));
        }
        let dev = v.device();
        v.set(&p.to_device(dev)?)?;
        st.m = get(&format!("m.{n}"))?.to_device(dev)?;
        st.v = get(&format!("v.{n}"))?.to_device(dev)?;
        st.step = get(&format!("step.{n}"))?.to_vec1::<i64>()?[0] as u64;
    }
    let recent = get("recent_losses")?.to_vec1::<f64>()?;
    // Checkpoints written before training time was recorded (the third world's UNet) count
    // from zero.
    let seconds = match map.get("seconds") {
        Some(t) => t.to_vec1::<f64>()?[0],
        None => 0.0,
    };
    Ok(Resumable {
        step,
        recent,
        seconds,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A least-squares fit of 3 parameters to a fixed target: the loss of step `s` weights
    /// the coordinates by the step, so a resumed run that replayed or skipped a step, or lost
    /// the optimiser's moments, ends somewhere else.
    fn run_fit(vars: &[Var], steps: usize, ckpt: &Path, fail_at: Option<usize>) -> Result<Fitted> {
        let target = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?;
        let named: Vec<(String, Var)> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("w{i}"), v.clone()))
            .collect();
        fit("toy", named, steps, 0.05, ckpt, |step| {
            if Some(step) == fail_at {
                return Err(Error::Invalid("interrupted".into()));
            }
            let w = Tensor::new(
                &[1.0f32, 1.0 + (step % 7) as f32, 2.0 + (step % 3) as f32],
                &Device::Cpu,
            )?;
            Ok((vars[0].as_tensor() - &target)?.sqr()?.mul(&w)?.sum_all()?)
        })
    }

    fn fresh() -> Var {
        Var::from_tensor(&Tensor::new(&[0.0f32, 0.0, 0.0], &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn an_interrupted_fit_resumes_to_the_uninterrupted_result() {
        let dir = std::env::temp_dir().join(format!("reneg-fit-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ckpt = dir.join(".toy.partial.safetensors");
        let _ = std::fs::remove_file(&ckpt);
        let steps = 2 * CHECKPOINT_EVERY + 50;

        let whole = fresh();
        let whole_fit = run_fit(std::slice::from_ref(&whole), steps, &ckpt, None).unwrap();
        let _ = std::fs::remove_file(&ckpt);

        // Interrupted after the second checkpoint: the work since it is lost, not the rest.
        let broken = fresh();
        let fail = 2 * CHECKPOINT_EVERY + 20;
        assert!(run_fit(std::slice::from_ref(&broken), steps, &ckpt, Some(fail)).is_err());
        assert!(
            ckpt.is_file(),
            "no checkpoint was written before the interruption"
        );
        let resumed = fresh();
        let resumed_fit = run_fit(std::slice::from_ref(&resumed), steps, &ckpt, None).unwrap();

        let a = whole.as_tensor().to_vec1::<f32>().unwrap();
        let b = resumed.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(
            a, b,
            "resumed parameters differ from the uninterrupted run's"
        );
        assert_eq!(whole_fit.final_loss, resumed_fit.final_loss);
        // The interrupted run's time up to its checkpoint is carried into the resumed one's
        // report; an uninterrupted run has none to carry.
        assert_eq!(whole_fit.earlier_seconds, 0.0);
        assert!(resumed_fit.earlier_seconds > 0.0);
        // The run moved: the check above is not two untouched starts compared.
        assert!(a.iter().all(|x| *x != 0.0), "{a:?}");

        // A checkpoint of another model's shape is refused with its path, not loaded.
        let other = Var::from_tensor(&Tensor::new(&[0.0f32; 4], &Device::Cpu).unwrap()).unwrap();
        assert!(run_fit(std::slice::from_ref(&resumed), steps, &ckpt, Some(fail)).is_err());
        let err = run_fit(&[other], steps, &ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(".toy.partial.safetensors") && err.contains("shape"),
            "{err}"
        );
        // A checkpoint of other tensors (other names) is refused, naming what is missing.
        let other: HashMap<String, Tensor> = [
            (
                "param.other",
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            ),
            ("step", Tensor::new(&[1i64], &Device::Cpu).unwrap()),
            ("recent_losses", Tensor::new(&[1f64], &Device::Cpu).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&other, &ckpt).unwrap();
        let err = run_fit(std::slice::from_ref(&resumed), steps, &ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("param.w0"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
