//! `reneg generate`: guided text-to-image (or text-to-video) with a null-text, prompt or
//! embedding negative. Writes one PNG per image (generation parameters in a `parameters` text
//! chunk, as other SD front ends do) and one JSON line per image in `images.jsonl`. A video
//! model's clip is written as its frames (PNGs in a folder), an animated PNG, and an MP4 when
//! an `ffmpeg` is on the PATH.

use super::rewards::RewardArg;
use super::{
    check_steps, create_out_dir, device, image_size, lib, load_embedding_for, load_model,
    load_rewards, setup_precision, user, ModelArgs, Precision, SamplerArgs,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use reneg::embedding::NegativeEmbedding;
use reneg::prompts::{self, Prompt};
use reneg::train::per_sample::adapt;
use reneg::train::step::{Objective, Sampling};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[command(flatten)]
    pub control: super::control::ControlArgs,
    /// A prompt; repeat for several.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A prompt file: .txt (one per line), .tsv with a Prompt column, or .json list.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Negative prompt (default: null text, the empty prompt).
    #[arg(long, conflicts_with = "negative_embedding")]
    pub negative_prompt: Option<String>,
    /// A learned negative embedding (.safetensors, or a PyTorch .bin/.pt such as the official ReNeg files).
    #[arg(long)]
    pub negative_embedding: Option<PathBuf>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// DDIM sampling steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Base seed: image i (counting over all prompts) uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height in pixels (default: the UNet's sample_size times the VAE factor).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: as the height).
    #[arg(long)]
    pub width: Option<usize>,
    /// Images per prompt (seeds counted on over all images).
    #[arg(long, default_value_t = 1)]
    pub num_images_per_prompt: usize,
    /// Images per UNet batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Frames per clip, for a text-to-video model (ModelScope, ZeroScope; default 16, as
    /// diffusers' TextToVideoSDPipeline).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Playback speed of a clip's animated PNG and MP4.
    #[arg(long, default_value_t = 8)]
    pub fps: u32,
    /// Start from these latents (safetensors, one tensor [N, C, h, w]; image i takes row i)
    /// instead of seeded noise, to compare with other implementations.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Numeric precision: f32, tf32 (tensor-core matmuls on CUDA; f32 on the CPU), bf16 or fp16
    /// (autocast: low-precision weights and matmuls, f32 norms, softmax, latents and rewards;
    /// fp16 training scales the loss dynamically). --dtype is an alias.
    #[arg(long, alias = "dtype", value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Per-sample adaptation: a reward to adapt the negative to each prompt (repeat with
    /// --reward-model for several).
    #[arg(long, value_enum)]
    pub reward: Vec<RewardArg>,
    /// The model of each --reward, in the same order.
    #[arg(long)]
    pub reward_model: Vec<PathBuf>,
    // Per-sample adaptation (with --reward).
    #[command(flatten)]
    pub adapt: super::AdaptArgs,
    /// Save each prompt's adapted embedding in this folder.
    #[arg(long)]
    pub save_adapted: Option<PathBuf>,
    /// cpu, or cuda:N in CUDA builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output folder.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
}

struct Job {
    index: usize,
    prompt: Prompt,
    seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let model_name = args.model.name()?;
    let mut prompt_list: Vec<Prompt> = args
        .prompt
        .iter()
        .map(|p| Prompt {
            text: p.clone(),
            category: None,
            control_image: None,
        })
        .collect();
    if let Some(file) = &args.prompts {
        prompt_list.extend(prompts::load(file).map_err(lib)?);
    }
    if prompt_list.is_empty() {
        return Err(user("no prompts: give --prompt TEXT or --prompts FILE"));
    }
    if args.batch_size == 0 {
        return Err(user("--batch-size must be at least 1"));
    }
    if args.num_images_per_prompt == 0 {
        return Err(user("--num-images-per-prompt must be at least 1"));
    }
    let device = device(&args.device)?;
    let dtype: DType = setup_precision(args.precision, &device)?;
    create_out_dir(&args.out)?;

    let mut sd = load_model(&args.model, dtype, &device)?;
    args.sampler.apply(&mut sd)?;
    super::check_prompts(&sd, &prompt_list)?;
    check_steps(&mut sd, args.steps)?;
    let control_size = super::control::apply(&mut sd, &args.control, None, dtype, &device)?;
    let (height, width) = super::control::check_size(control_size, args.height, args.width)?;
    let (h, w) = image_size(&sd, height, width)?;
    // A1111-style: the ControlNets named with their weights after the model.
    let control_label: String = sd
        .controls()
        .iter()
        .enumerate()
        .map(|(k, c)| {
            format!(
                ", ControlNet {k}: \"model: {}, weight: {}{}\"",
                c.source.display(),
                c.scale,
                if args.control.guess_mode {
                    ", guess mode"
                } else {
                    ""
                }
            )
        })
        .collect();
    let frames = frames_for(&sd, args.frames, &model_name)?;
    if args.fps == 0 || args.fps > u16::MAX as u32 {
        return Err(user("--fps must be between 1 and 65535"));
    }
    let latent_shape = sd.latent_shape(h, w, frames).map_err(lib)?;

    let (uncond, negative_label) = match (&args.negative_embedding, &args.negative_prompt) {
        (Some(path), _) => (
            load_embedding_for(&sd, path)?,
            format!("embedding:{}", path.display()),
        ),
        (None, text) => {
            let text = text.clone().unwrap_or_default();
            (sd.encode(&text).map_err(lib)?, text)
        }
    };
    let init = match &args.init_latents {
        Some(p) => Some(load_init_latents(
            p,
            &latent_shape,
            prompt_list.len() * args.num_images_per_prompt,
        )?),
        None => None,
    };

    let objective = if args.reward.is_empty() {
        None
    } else {
        if args.init_latents.is_some() || args.batch_size != 1 {
            return Err(user("per-sample adaptation (--reward) works per image: drop --init-latents and --batch-size"));
        }
        let o = Objective::new(load_rewards(
            &args.reward,
            &args.reward_model,
            dtype,
            &device,
        )?);
        o.check_optimisable().map_err(lib)?;
        Some(o)
    };
    let adapt_cfg = args.adapt.config(args.steps);
    let sampling = Sampling {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: h,
        width: w,
        frames,
        backward: args.adapt.adapt_backward,
        loss_scale: 1.0,
    };

    let n = args.num_images_per_prompt;
    let jobs: Vec<Job> = prompt_list
        .into_iter()
        .flat_map(|p| std::iter::repeat_n(p, n))
        .enumerate()
        .map(|(i, prompt)| Job {
            index: i,
            prompt,
            seed: args.seed + i as u64,
        })
        .collect();
    let bar = super::progress::Progress::new(
        (jobs.len() * args.steps) as u64,
        "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        "sampling step",
    );
    let mut jsonl = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("images.jsonl"))
        .map_err(|e| user(format!("{}: cannot write: {e}", args.out.display())))?;

    for batch in jobs.chunks(args.batch_size) {
        let b = batch.len();
        let mut noise = vec![];
        let mut conds = vec![];
        for job in batch {
            noise.push(match &init {
                Some(t) => t
                    .get(job.index)?
                    .unsqueeze(0)?
                    .to_dtype(sd.dtype())?
                    .to_device(&device)?,
                None => reneg::rng::randn(
                    job.seed,
                    &[vec![1], latent_shape.clone()].concat(),
                    sd.dtype(),
                    &device,
                )?,
            });
            conds.push(sd.encode(&job.prompt.text).map_err(lib)?);
        }
        let noise = Tensor::cat(&noise, 0)?;
        let cond = sd.batch(&conds.iter().collect::<Vec<_>>()).map_err(lib)?;
        let mut uncond_b = uncond.repeat(b).and_then(|u| u.contiguous()).map_err(lib)?;
        if let Some(obj) = &objective {
            let job = &batch[0];
            let a = adapt(
                &mut sd,
                obj,
                &uncond,
                &job.prompt.text,
                job.seed,
                &adapt_cfg,
                &sampling,
            )
            .map_err(lib)?;
            // Printed also when the bar is hidden (a log, not a terminal).
            bar.suspend(|| {
                println!(
                    "image {}: adapted reward {:.4} -> {:.4} in {} step(s)",
                    job.index + 1,
                    a.start_reward,
                    a.best_reward,
                    a.history.len()
                )
            });
            if let Some(dir) = &args.save_adapted {
                let mut e = NegativeEmbedding::from_conditioning(&a.embedding).map_err(lib)?;
                e.metadata.insert("prompt".into(), job.prompt.text.clone());
                e.metadata.insert("seed".into(), job.seed.to_string());
                e.metadata
                    .insert("reward_start".into(), a.start_reward.to_string());
                e.metadata
                    .insert("reward_best".into(), a.best_reward.to_string());
                let name = format!("{:05}-seed{}.safetensors", job.index, job.seed);
                e.save_safetensors(&dir.join(name)).map_err(lib)?;
            }
            uncond_b = a
                .embedding
                .map(|_, t| Ok(t.to_dtype(sd.dtype())?.to_device(&device)?))
                .map_err(lib)?;
        }
        bar.set_message(format!("image {}/{}", batch[0].index + 1, jobs.len()));
        let latents = sd
            .sample(
                noise,
                args.steps,
                &cond,
                &uncond_b,
                args.guidance_scale,
                &batch.iter().map(|j| j.seed).collect::<Vec<_>>(),
                |_, _| bar.inc(b as u64),
            )
            .map_err(lib)?;
        let images = sd.decode(&latents).map_err(lib)?;
        let ffmpeg = if frames.is_some() {
            reneg::video::find_ffmpeg()
        } else {
            None
        };
        for (k, job) in batch.iter().enumerate() {
            let stem = format!("{:05}-seed{}", job.index, job.seed);
            let name = format!("{stem}{}", if frames.is_some() { ".apng" } else { ".png" });
            let path = args.out.join(&name);
            let params = format!(
                "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
                job.prompt.text,
                negative_label,
                args.steps,
                sd.scheduler.label(),
                args.guidance_scale,
                job.seed,
                w,
                h,
                model_name
            ) + &control_label
                + &frames.map(|n| format!(", Frames: {n}, FPS: {}", args.fps)).unwrap_or_default();
            let clip = match frames {
                None => {
                    save_png(&images.get(k)?, &path, &params)?;
                    None
                }
                Some(_) => Some(save_clip(
                    &images.get(k)?,
                    &args.out,
                    &stem,
                    args.fps,
                    &params,
                    ffmpeg.as_deref(),
                    &bar,
                )?),
            };
            let record = serde_json::json!({
                "file": name,
                "frames": clip.as_ref().map(|c| c.frames),
                "frames_dir": clip.as_ref().map(|c| c.frames_dir.clone()),
                "mp4": clip.as_ref().and_then(|c| c.mp4.clone()),
                "fps": clip.as_ref().map(|_| args.fps),
                "prompt": job.prompt.text,
                "category": job.prompt.category,
                "negative": negative_label,
                "seed": job.seed,
                "init_latents": args.init_latents.as_ref().map(|p| p.display().to_string()),
                "steps": args.steps,
                "guidance_scale": args.guidance_scale,
                "height": h,
                "width": w,
                "model": model_name,
                "vae": args.model.vae.as_ref().map(|p| p.display().to_string()),
                "clip_skip": args.model.clip_skip,
                "scheduler": sd.scheduler.kind().name(),
                "controlnet": args.control.controlnet,
                "control_image": args.control.control_image,
                "controlnet_scale": args.control.controlnet_scale,
                "guess_mode": args.control.guess_mode,
                "control_preprocess": args.control.control_preprocess.map(|p| format!("{p:?}").to_lowercase()),
                "eta": sd.scheduler.eta(),
                "guidance_rescale": sd.guidance_rescale,
                "loras": args.model.lora,
                "prompt_syntax": args.model.prompt_syntax,
                "embeddings": args.model.embeddings,
                "dtype": format!("{dtype:?}").to_lowercase(),
                "precision": args.precision.name(),
            });
            writeln!(jsonl, "{record}").context("writing images.jsonl")?;
            bar.println(path.display().to_string());
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The frame count of a run: `--frames` for a video model (16 when not given), refused for an
/// image model.
pub(crate) fn frames_for(
    sd: &reneg::Pipeline,
    frames: Option<usize>,
    model: &str,
) -> Result<Option<usize>> {
    match (sd.is_video(), frames) {
        (true, None) => Ok(Some(16)),
        (true, Some(0)) => Err(user("--frames must be at least 1")),
        (true, Some(n)) => Ok(Some(n)),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(user(format!(
            "--frames: {model} is a text-to-image model; drop --frames or give a text-to-video model (a TextToVideoSDPipeline folder)"
        ))),
    }
}

/// Where a clip's files went.
struct Clip {
    frames: usize,
    frames_dir: String,
    mp4: Option<String>,
}

/// Writes a decoded clip `[3, F, H, W]`: each frame as `STEM-frames/NNN.png`, the clip as
/// `STEM.apng`, and `STEM.mp4` when `ffmpeg` is given (a failed MP4 is reported, not fatal:
/// the frames and the APNG hold the clip).
fn save_clip(
    video: &Tensor,
    out: &Path,
    stem: &str,
    fps: u32,
    params: &str,
    ffmpeg: Option<&Path>,
    bar: &super::progress::Progress,
) -> Result<Clip> {
    let n = video.dim(1)?;
    let frames_dir = format!("{stem}-frames");
    let mut rgbs = Vec::with_capacity(n);
    for i in 0..n {
        let frame = video.narrow(1, i, 1)?.squeeze(1)?;
        let rgb = reneg::io::Rgb::from_pixels(&frame).map_err(lib)?;
        let path = out.join(&frames_dir).join(format!("{i:03}.png"));
        reneg::io::write_png(&rgb, &path, Some(params)).map_err(lib)?;
        rgbs.push(rgb);
    }
    reneg::video::write_apng(&rgbs, fps, &out.join(format!("{stem}.apng")), Some(params))
        .map_err(lib)?;
    let mp4 = match ffmpeg {
        None => None,
        Some(ff) => {
            let name = format!("{stem}.mp4");
            match reneg::video::write_mp4(&rgbs, fps, &out.join(&name), ff) {
                Ok(()) => Some(name),
                Err(e) => {
                    bar.suspend(|| eprintln!("warning: no MP4 for {stem}: {e}"));
                    None
                }
            }
        }
    };
    Ok(Clip {
        frames: n,
        frames_dir,
        mp4,
    })
}

/// Loads `[N, C, h, w]` latents (`[N, C, F, h, w]` for videos; one safetensors tensor) and
/// checks them against the model.
fn load_init_latents(path: &Path, shape: &[usize], images: usize) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| user(format!("{}: cannot read latents: {e}", path.display())))?;
    let t = match tensors.len() {
        1 => tensors.into_values().next().unwrap(),
        _ => tensors
            .get("init_latents")
            .or_else(|| tensors.get("latents"))
            .cloned()
            .ok_or_else(|| {
                user(format!(
                    "{}: holds several tensors; name the latents `init_latents` or keep only one",
                    path.display()
                ))
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
        return Err(user(format!(
            "{}: latents of shape {:?}, but {images} image(s) of this model and size need [{}]",
            path.display(),
            t.dims(),
            want.join(", ")
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes `[3, H, W]` pixels in [-1, 1] as an 8-bit RGB PNG with a `parameters` text chunk,
/// atomically.
pub fn save_png(image: &Tensor, path: &Path, parameters: &str) -> Result<()> {
    let rgb = reneg::io::Rgb::from_pixels(image).map_err(lib)?;
    reneg::io::write_png(&rgb, path, Some(parameters)).map_err(lib)
}
