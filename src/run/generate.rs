//! Guided text-to-image (or text-to-video) generation with a null-text, prompt or embedding
//! negative, optionally adapted per image to rewards (ReNeg Sec. 3.3). Writes the plan
//! (`generate.json`), one PNG per image (the generation parameters in a `parameters` text
//! chunk, as other SD front ends do) and one JSON line per image in `images.jsonl`; a video
//! model's clip as its frames (PNGs in a folder), an animated PNG, and an MP4 when an `ffmpeg`
//! is on the PATH.

use super::Progress;
use crate::conditioning::Conditioning;
use crate::embedding::NegativeEmbedding;
use crate::error::{Error, Result};
use crate::prompts::Prompt;
use crate::train::per_sample::{adapt, AdaptConfig};
use crate::train::step::{Backward, Objective, Sampling};
use crate::Pipeline;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file in the output folder that holds the plan of the latest run into it.
pub const PLAN: &str = "generate.json";

/// The negative of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Negative {
    /// None given: what the family's pipeline uses then (the null text "", or SDXL's zeros
    /// under `force_zeros_for_empty_prompt`).
    None,
    /// A negative prompt ("" is the null text).
    Prompt(String),
    /// A negative-embedding file (every part it has).
    Embedding(PathBuf),
}

/// Per-image adaptation of the negative to the objective the caller gives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptPlan {
    pub config: AdaptConfig,
    pub backward: Backward,
    /// A folder to save each image's adapted negative in.
    pub save_to: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratePlan {
    pub prompts: Vec<Prompt>,
    pub negative: Negative,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Image i (counting over all prompts) uses seed + i.
    pub seed: u64,
    pub height: usize,
    pub width: usize,
    pub images_per_prompt: usize,
    /// Images per denoiser batch.
    pub batch_size: usize,
    /// Frames per clip (a video model's; None for an image model).
    pub frames: Option<usize>,
    /// A clip's playback rate.
    pub fps: u32,
    /// SDXL's size conditioning (the image's size by default).
    #[serde(default)]
    pub sizes: crate::family::roles::SizeConditioning,
    /// Latents to start from instead of seeded noise (row i for image i).
    pub init_latents: Option<PathBuf>,
    pub adapt: Option<AdaptPlan>,
    pub out: PathBuf,
    /// The model's name in the parameters and records.
    pub model: String,
    /// Appended to each image's parameters (A1111's ", ControlNet 0: ...").
    pub parameters_suffix: String,
    /// Fields every record carries besides the image's own: how the caller loaded and set up
    /// the model (files, options, precision).
    pub provenance: Map<String, Value>,
}

impl GeneratePlan {
    /// Refuses settings no run could use, naming them.
    pub fn check(&self) -> Result<()> {
        let refuse = |m: &str| Err(Error::Invalid(m.into()));
        if self.prompts.is_empty() {
            return refuse("no prompts: give --prompt TEXT or --prompts FILE");
        }
        if self.batch_size == 0 {
            return refuse("--batch-size must be at least 1");
        }
        if self.images_per_prompt == 0 {
            return refuse("--num-images-per-prompt must be at least 1");
        }
        if self.fps == 0 || self.fps > u16::MAX as u32 {
            return refuse("--fps must be between 1 and 65535");
        }
        if self.adapt.is_some() && (self.init_latents.is_some() || self.batch_size != 1) {
            return refuse("per-sample adaptation (--reward) works per image: drop --init-latents and --batch-size");
        }
        Ok(())
    }

    /// The negative's label in parameters and records.
    fn negative_label(&self) -> String {
        match &self.negative {
            Negative::None => String::new(),
            Negative::Prompt(t) => t.clone(),
            Negative::Embedding(p) => format!("embedding:{}", p.display()),
        }
    }
}

/// One image of the run.
struct Job {
    index: usize,
    prompt: Prompt,
    seed: u64,
}

/// Generates every image of `plan` with `sd` (loaded and set up by the caller: sampler,
/// ControlNets); `objective` is the rewards of the plan's adaptation (loaded by the caller,
/// since they may come from crates the library does not know). Returns the records written.
pub fn generate(
    sd: &mut Pipeline,
    plan: &GeneratePlan,
    objective: Option<&Objective>,
    progress: &mut dyn Progress,
) -> Result<Vec<Value>> {
    plan.check()?;
    if plan.adapt.is_some() != objective.is_some() {
        return Err(Error::Invalid(
            "adaptation needs both its settings and an objective".into(),
        ));
    }
    for p in &plan.prompts {
        sd.check_prompt(&p.text)?;
    }
    sd.set_fps(plan.fps)?;
    sd.set_size_conditioning(plan.sizes)?;
    // lvdm's uniform spacing can visit more timesteps than asked: count what runs.
    sd.scheduler.set_timesteps(plan.steps)?;
    let visited = sd.scheduler.len();
    let latent_shape = sd.latent_shape(plan.height, plan.width, plan.frames)?;
    let negative = match &plan.negative {
        Negative::None => sd.no_negative()?,
        Negative::Prompt(t) => sd.encode(t)?,
        Negative::Embedding(p) => sd.negative(&NegativeEmbedding::load(p)?, p)?,
    };
    // The prompts encoded now, after the negative (without one, PixArt's is T5's ""): a costly
    // encoder (T5-XXL) is let go before sampling.
    let texts: Vec<&str> = plan.prompts.iter().map(|p| p.text.as_str()).collect();
    sd.encode_ahead(&texts)?;
    let n = plan.prompts.len() * plan.images_per_prompt;
    let init = match &plan.init_latents {
        Some(p) => Some(load_init_latents(p, &latent_shape, n)?),
        None => None,
    };
    // Everything is checked; only now is anything written: the plan first (the latest run's;
    // each image's record in images.jsonl carries its own settings).
    std::fs::create_dir_all(&plan.out)
        .map_err(|e| Error::file(&plan.out, format!("cannot create the output folder: {e}")))?;
    let text = serde_json::to_string_pretty(plan).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::io::write_atomic(&plan.out.join(PLAN), text.as_bytes())?;
    let jobs: Vec<Job> = plan
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), plan.images_per_prompt))
        .enumerate()
        .map(|(i, prompt)| Job {
            index: i,
            prompt,
            seed: plan.seed + i as u64,
        })
        .collect();
    let path = plan.out.join("images.jsonl");
    let mut jsonl = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    // Looked up once a run (a search of the PATH), for clips only.
    let ffmpeg = plan.frames.and_then(|_| crate::video::find_ffmpeg());
    progress.begin((jobs.len() * visited) as u64, "sampling step");
    let mut records = vec![];
    for batch in jobs.chunks(plan.batch_size) {
        let uncond = match (&plan.adapt, objective) {
            (Some(a), Some(o)) => adapted(sd, plan, a, o, &negative, &batch[0], progress)?,
            _ => negative.repeat(batch.len())?.contiguous()?,
        };
        progress.status(&format!("image {}/{}", batch[0].index + 1, jobs.len()));
        let images = sample(
            sd,
            plan,
            batch,
            &uncond,
            init.as_ref(),
            &latent_shape,
            progress,
        )?;
        for (k, job) in batch.iter().enumerate() {
            let record = write_image(sd, plan, job, &images.get(k)?, ffmpeg.as_deref(), progress)?;
            writeln!(jsonl, "{record}")
                .map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
            records.push(record);
        }
    }
    progress.finish();
    Ok(records)
}

/// The negative adapted to one image's prompt and seed (saved when the plan asks).
fn adapted(
    sd: &mut Pipeline,
    plan: &GeneratePlan,
    a: &AdaptPlan,
    objective: &Objective,
    negative: &Conditioning,
    job: &Job,
    progress: &mut dyn Progress,
) -> Result<Conditioning> {
    let sampling = Sampling {
        steps: plan.steps,
        guidance_scale: plan.guidance_scale,
        height: plan.height,
        width: plan.width,
        frames: plan.frames,
        backward: a.backward,
        loss_scale: 1.0,
    };
    let r = adapt(
        sd,
        objective,
        negative,
        &job.prompt.text,
        job.seed,
        &a.config,
        &sampling,
    )?;
    progress.note(&format!(
        "image {}: adapted reward {:.4} -> {:.4} in {} step(s)",
        job.index + 1,
        r.start_reward,
        r.best_reward,
        r.history.len()
    ));
    if let Some(dir) = &a.save_to {
        let mut e = NegativeEmbedding::from_conditioning(&r.embedding)?;
        e.metadata.insert("prompt".into(), job.prompt.text.clone());
        e.metadata.insert("seed".into(), job.seed.to_string());
        e.metadata
            .insert("reward_start".into(), r.start_reward.to_string());
        e.metadata
            .insert("reward_best".into(), r.best_reward.to_string());
        let name = format!("{:05}-seed{}.safetensors", job.index, job.seed);
        e.save_safetensors(&dir.join(name))?;
    }
    let (dtype, device) = (sd.dtype(), sd.device().clone());
    r.embedding
        .map(|_, t| Ok(t.to_dtype(dtype)?.to_device(&device)?))
}

/// One batch sampled and decoded: `[b, 3, H, W]` (`[b, 3, F, H, W]` for clips).
fn sample(
    sd: &mut Pipeline,
    plan: &GeneratePlan,
    batch: &[Job],
    uncond: &Conditioning,
    init: Option<&Tensor>,
    latent_shape: &[usize],
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let (dtype, device) = (sd.dtype(), sd.device().clone());
    let mut noise = vec![];
    let mut conds = vec![];
    for job in batch {
        noise.push(match init {
            Some(t) => t
                .get(job.index)?
                .unsqueeze(0)?
                .to_dtype(dtype)?
                .to_device(&device)?,
            None => crate::rng::randn(
                job.seed,
                &[vec![1], latent_shape.to_vec()].concat(),
                dtype,
                &device,
            )?,
        });
        conds.push(sd.encode(&job.prompt.text)?);
    }
    let cond = sd.batch(&conds.iter().collect::<Vec<_>>())?;
    let seeds: Vec<u64> = batch.iter().map(|j| j.seed).collect();
    let b = batch.len() as u64;
    let latents = sd.sample(
        Tensor::cat(&noise, 0)?,
        plan.steps,
        &cond,
        uncond,
        plan.guidance_scale,
        &seeds,
        |_, _| progress.advance(b),
    )?;
    sd.decode(&latents)
}

/// Writes one image (or clip) and returns its record.
fn write_image(
    sd: &Pipeline,
    plan: &GeneratePlan,
    job: &Job,
    image: &Tensor,
    ffmpeg: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<Value> {
    let stem = format!("{:05}-seed{}", job.index, job.seed);
    let video = plan.frames.is_some();
    let name = format!("{stem}{}", if video { ".apng" } else { ".png" });
    let path = plan.out.join(&name);
    let params = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        job.prompt.text,
        plan.negative_label(),
        plan.steps,
        sd.scheduler.label(),
        plan.guidance_scale,
        job.seed,
        plan.width,
        plan.height,
        plan.model
    ) + &plan.parameters_suffix
        + &plan
            .frames
            .map(|n| format!(", Frames: {n}, FPS: {}", plan.fps))
            .unwrap_or_default();
    let clip = if video {
        Some(save_clip(
            image, &plan.out, &stem, plan.fps, &params, ffmpeg, progress,
        )?)
    } else {
        save_png(image, &path, &params)?;
        None
    };
    let mut record = serde_json::json!({
        "file": name,
        "frames": clip.as_ref().map(|c| c.frames),
        "frames_dir": clip.as_ref().map(|c| c.frames_dir.clone()),
        "mp4": clip.as_ref().and_then(|c| c.mp4.clone()),
        "fps": clip.as_ref().map(|_| plan.fps),
        "prompt": job.prompt.text,
        "category": job.prompt.category,
        "negative": plan.negative_label(),
        "seed": job.seed,
        "init_latents": plan.init_latents.as_ref().map(|p| p.display().to_string()),
        "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
        "height": plan.height,
        "width": plan.width,
        "model": plan.model,
        "scheduler": sd.scheduler.kind().name(),
        "eta": sd.scheduler.eta(),
        "guidance_rescale": sd.guidance_rescale,
        "dtype": format!("{:?}", sd.weight_dtype()).to_lowercase(),
    });
    if let Value::Object(m) = &mut record {
        m.extend(plan.provenance.clone());
    }
    progress.note(&path.display().to_string());
    Ok(record)
}

/// Where a clip's files went.
struct Clip {
    frames: usize,
    frames_dir: String,
    mp4: Option<String>,
}

/// Writes a decoded clip `[3, F, H, W]`: each frame as `STEM-frames/NNN.png`, the clip as
/// `STEM.apng`, and `STEM.mp4` when `ffmpeg` is given (a failed MP4 is a warning, not fatal:
/// the frames and the APNG hold the clip).
fn save_clip(
    video: &Tensor,
    out: &Path,
    stem: &str,
    fps: u32,
    params: &str,
    ffmpeg: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<Clip> {
    let n = video.dim(1)?;
    let frames_dir = format!("{stem}-frames");
    let mut rgbs = Vec::with_capacity(n);
    for i in 0..n {
        let frame = video.narrow(1, i, 1)?.squeeze(1)?;
        let rgb = crate::io::Rgb::from_pixels(&frame)?;
        let path = out.join(&frames_dir).join(format!("{i:03}.png"));
        crate::io::write_png(&rgb, &path, Some(params))?;
        rgbs.push(rgb);
    }
    crate::video::write_apng(&rgbs, fps, &out.join(format!("{stem}.apng")), Some(params))?;
    let mp4 = ffmpeg.and_then(|ff| {
        let name = format!("{stem}.mp4");
        match crate::video::write_mp4(&rgbs, fps, &out.join(&name), ff) {
            Ok(()) => Some(name),
            Err(e) => {
                progress.warn(&format!("no MP4 for {stem}: {e}"));
                None
            }
        }
    });
    Ok(Clip {
        frames: n,
        frames_dir,
        mp4,
    })
}

/// Loads `[N, C, h, w]` latents (`[N, C, F, h, w]` for videos; one safetensors tensor) and
/// checks them against the model's latent `shape` and the number of images.
fn load_init_latents(path: &Path, shape: &[usize], images: usize) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::file(path, format!("cannot read latents: {e}")))?;
    let t = match tensors.len() {
        1 => tensors.into_values().next().expect("one tensor"),
        _ => tensors
            .get("init_latents")
            .or_else(|| tensors.get("latents"))
            .cloned()
            .ok_or_else(|| {
                Error::file(
                    path,
                    "holds several tensors; name the latents `init_latents` or keep only one",
                )
            })?,
    };
    let t = if t.rank() == shape.len() {
        t.unsqueeze(0)?
    } else {
        t
    };
    let ok = t.rank() == shape.len() + 1 && t.dims()[1..] == shape[..] && t.dim(0)? >= images;
    if !ok {
        let want: Vec<String> = std::iter::once(images)
            .chain(shape.iter().copied())
            .map(|d| d.to_string())
            .collect();
        return Err(Error::file(
            path,
            format!(
                "latents of shape {:?}, but {images} image(s) of this model and size need [{}]",
                t.dims(),
                want.join(", ")
            ),
        ));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes `[3, H, W]` pixels in [-1, 1] as an 8-bit RGB PNG with a `parameters` text chunk,
/// atomically.
pub fn save_png(image: &Tensor, path: &Path, parameters: &str) -> Result<()> {
    let rgb = crate::io::Rgb::from_pixels(image)?;
    crate::io::write_png(&rgb, path, Some(parameters))
}
