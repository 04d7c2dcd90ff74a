//! `reneg generate`: the flags as a [`GeneratePlan`] for [`reneg::run::generate`], which
//! writes the images (or clips) and `images.jsonl`.

use super::rewards::RewardArg;
use super::{
    check_steps, device, image_size, lib, load_model, load_rewards, setup_precision, ModelArgs,
    Precision, SamplerArgs,
};
use anyhow::Result;
use candle_core::DType;
use reneg::prompts::Prompt;
use reneg::run::generate::{AdaptPlan, GeneratePlan, Negative};
use reneg::train::step::Objective;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[command(flatten)]
    pub sizes: super::SizeArgs,
    #[command(flatten)]
    pub control: super::control::ControlArgs,
    /// A prompt; repeat for several.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A prompt file: .txt (one per line), .tsv with a Prompt column, or .json list.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Negative prompt (default: none, i.e. what the model's pipeline uses without one: the
    /// null text "", or SDXL's zeros when its folder says force_zeros_for_empty_prompt).
    #[arg(long, conflicts_with = "negative_embedding")]
    pub negative_prompt: Option<String>,
    /// A learned negative embedding (.safetensors, or a PyTorch .bin/.pt such as the official ReNeg files).
    #[arg(long)]
    pub negative_embedding: Option<PathBuf>,
    /// Classifier-free guidance scale (default: the family's: 7.5; 12 for VideoCrafter2).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Sampling steps (default: 30; 50 for VideoCrafter2, whose sampler visits one more
    /// timestep when the count does not divide 1000).
    #[arg(long)]
    pub steps: Option<usize>,
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
    /// Frames per clip, for a text-to-video model (ModelScope, ZeroScope, VideoCrafter2;
    /// default 16).
    #[arg(long)]
    pub frames: Option<usize>,
    /// A clip's frame rate: its animated PNG's and MP4's playback speed, and for VideoCrafter2
    /// the rate the model is conditioned on, which changes the clip (default 8; 28 for
    /// VideoCrafter2, as its script).
    #[arg(long)]
    pub fps: Option<u32>,
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

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut prompts: Vec<Prompt> = args
        .prompt
        .iter()
        .map(|p| Prompt {
            text: p.clone(),
            ..Default::default()
        })
        .collect();
    if let Some(file) = &args.prompts {
        prompts.extend(reneg::prompts::load(file).map_err(lib)?);
    }
    let device = device(&args.device)?;
    let dtype: DType = setup_precision(args.precision, &device)?;
    let mut sd = load_model(&args.model, dtype, &device)?;
    args.sampler.apply(&mut sd)?;
    let steps = args.steps.unwrap_or(sd.defaults().steps);
    check_steps(&mut sd, steps)?;
    let control_size = super::control::apply(&mut sd, &args.control, dtype, &device)?;
    let (height, width) = super::control::check_size(control_size, args.height, args.width)?;
    let (height, width) = image_size(&sd, height, width)?;
    let objective = match args.reward.is_empty() {
        true => None,
        false => Some(Objective::new(load_rewards(
            &args.reward,
            &args.reward_model,
            dtype,
            &device,
        )?)),
    };
    let plan = plan(&args, &sd, prompts, (height, width))?;
    if let Some(o) = &objective {
        o.check_optimisable().map_err(lib)?;
    }
    let mut bar = super::progress::Progress::new(
        0,
        "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        "sampling step",
    );
    reneg::run::generate::generate(&mut sd, &plan, objective.as_ref(), &mut bar).map_err(lib)?;
    Ok(())
}

/// The run's plan from the flags and the loaded model.
fn plan(
    args: &GenerateArgs,
    sd: &reneg::Pipeline,
    prompts: Vec<Prompt>,
    (height, width): (usize, usize),
) -> Result<GeneratePlan> {
    let defaults = sd.defaults();
    let steps = args.steps.unwrap_or(defaults.steps);
    let negative = match (&args.negative_embedding, &args.negative_prompt) {
        (Some(path), _) => Negative::Embedding(path.clone()),
        (None, Some(text)) => Negative::Prompt(text.clone()),
        (None, None) => Negative::None,
    };
    let adapt = (!args.reward.is_empty()).then(|| AdaptPlan {
        config: args.adapt.config(steps),
        backward: args.adapt.adapt_backward,
        save_to: args.save_adapted.clone(),
    });
    Ok(GeneratePlan {
        prompts,
        negative,
        steps,
        guidance_scale: args.guidance_scale.unwrap_or(defaults.guidance_scale),
        seed: args.seed,
        height,
        width,
        images_per_prompt: args.num_images_per_prompt,
        batch_size: args.batch_size,
        frames: sd.frames(args.frames).map_err(lib)?,
        fps: args.fps.unwrap_or(defaults.fps),
        sizes: args.sizes.conditioning(),
        init_latents: args.init_latents.clone(),
        adapt,
        out: args.out.clone(),
        model: args.model.name()?,
        parameters_suffix: control_label(sd, args.control.guess_mode),
        provenance: provenance(args),
    })
}

/// A1111-style: the ControlNets named with their weights after the model.
fn control_label(sd: &reneg::Pipeline, guess_mode: bool) -> String {
    sd.controls()
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let guess = if guess_mode { ", guess mode" } else { "" };
            format!(
                ", ControlNet {k}: \"model: {}, weight: {}{guess}\"",
                c.source.display(),
                c.scale
            )
        })
        .collect()
}

/// What each record says of how the model was loaded and set up.
fn provenance(args: &GenerateArgs) -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({
        "vae": args.model.vae.as_ref().map(|p| p.display().to_string()),
        "clip_skip": args.model.clip_skip,
        "controlnet": args.control.controlnet,
        "control_image": args.control.control_image,
        "controlnet_scale": args.control.controlnet_scale,
        "guess_mode": args.control.guess_mode,
        "control_preprocess": args.control.control_preprocess.map(|p| format!("{p:?}").to_lowercase()),
        "loras": args.model.lora,
        "prompt_syntax": args.model.prompt_syntax,
        "embeddings": args.model.embeddings,
        "precision": args.precision.name(),
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}
