//! `reneg generate`: guided DDIM text-to-image with a null-text, prompt or embedding negative.
//! Writes one PNG per image (generation parameters in a `parameters` text chunk, as other SD
//! front ends do) and one JSON line per image in `images.jsonl`.

use super::rewards::RewardArg;
use super::{
    check_steps, create_out_dir, device, image_size, lib, load_embedding_for, load_model,
    load_rewards, setup_precision, user, ModelArgs, Precision, SamplerArgs,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
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
    super::set_sampler(&mut sd, args.sampler.scheduler, args.sampler.eta)?;
    super::check_prompts(&sd, &prompt_list)?;
    check_steps(&mut sd, args.steps)?;
    let control_size = super::control::apply(&mut sd, &args.control, None, dtype, &device)?;
    let (height, width) = super::control::check_size(control_size, args.height, args.width)?;
    let (h, w) = image_size(&sd, height, width)?;
    // A1111-style: the ControlNets named with their weights after the model.
    let control_label: String = sd
        .controls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            format!(
                ", ControlNet {k}: \"model: {}, weight: {}{}\"",
                c.source.display(),
                c.scale,
                if sd.guess_mode { ", guess mode" } else { "" }
            )
        })
        .collect();
    let f = sd.vae_scale();
    let latent_shape = [sd.latent_channels(), h / f, w / f];

    let (uncond, negative_label) = match (&args.negative_embedding, &args.negative_prompt) {
        (Some(path), _) => (
            load_embedding_for(&sd, path)?,
            format!("embedding:{}", path.display()),
        ),
        (None, text) => {
            let text = text.clone().unwrap_or_default();
            (sd.encode_prompt(&text).map_err(lib)?, text)
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
    let bar = ProgressBar::new((jobs.len() * args.steps) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
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
                    &[1, latent_shape[0], latent_shape[1], latent_shape[2]],
                    sd.dtype(),
                    &device,
                )?,
            });
            conds.push(sd.encode_prompt(&job.prompt.text).map_err(lib)?);
        }
        let noise = Tensor::cat(&noise, 0)?;
        let cond = sd
            .cat_contexts(&conds.iter().collect::<Vec<_>>())
            .map_err(lib)?;
        let mut uncond_b = uncond
            .broadcast_as((b, uncond.dim(1)?, uncond.dim(2)?))?
            .contiguous()?;
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
            bar.println(format!(
                "image {}: adapted reward {:.4} -> {:.4} in {} step(s)",
                job.index + 1,
                a.start_reward,
                a.best_reward,
                a.history.len()
            ));
            if let Some(dir) = &args.save_adapted {
                let mut e = NegativeEmbedding::new(a.embedding.clone()).map_err(lib)?;
                e.metadata.insert("prompt".into(), job.prompt.text.clone());
                e.metadata.insert("seed".into(), job.seed.to_string());
                e.metadata
                    .insert("reward_start".into(), a.start_reward.to_string());
                e.metadata
                    .insert("reward_best".into(), a.best_reward.to_string());
                let name = format!("{:05}-seed{}.safetensors", job.index, job.seed);
                e.save_safetensors(&dir.join(name)).map_err(lib)?;
            }
            uncond_b = a.embedding.to_dtype(sd.dtype())?.to_device(&device)?;
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
        for (k, job) in batch.iter().enumerate() {
            let name = format!("{:05}-seed{}.png", job.index, job.seed);
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
            ) + &control_label;
            save_png(&images.get(k)?, &path, &params)?;
            let record = serde_json::json!({
                "file": name,
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

/// Loads `[N, C, h, w]` latents (one safetensors tensor) and checks them against the model.
fn load_init_latents(path: &Path, shape: &[usize; 3], images: usize) -> Result<Tensor> {
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
    let t = if t.rank() == 3 { t.unsqueeze(0)? } else { t };
    let ok = t.rank() == 4 && t.dims()[1..] == shape[..] && t.dim(0)? >= images;
    if !ok {
        return Err(user(format!(
            "{}: latents of shape {:?}, but {images} image(s) of this model and size need [{images}, {}, {}, {}]",
            path.display(),
            t.dims(),
            shape[0],
            shape[1],
            shape[2]
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes `[3, H, W]` pixels in [-1, 1] as an 8-bit RGB PNG with a `parameters` text chunk,
/// atomically.
pub fn save_png(image: &Tensor, path: &Path, parameters: &str) -> Result<()> {
    let img = ((image.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((1, 2, 0))?
        .to_dtype(DType::U8)?;
    let (height, width, _) = img.dims3()?;
    let data = img.flatten_all()?.to_vec1::<u8>()?;
    let rgb = reneg::io::Rgb {
        width,
        height,
        data,
    };
    reneg::io::write_png(&rgb, path, Some(parameters)).map_err(lib)
}
