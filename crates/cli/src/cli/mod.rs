//! Command implementations and what they share: model and device options, and the mapping
//! of errors to exit codes.

pub mod builtin;
pub mod control;
pub mod embedding;
pub mod eval;
pub mod generate;
pub mod mini;
pub mod progress;
pub mod rewards;
pub mod score;
pub mod train;

use anyhow::Result;
use candle_core::{DType, Device};
pub use reneg::precision::Precision;
use reneg::run::eval::AdaptSettings;
use reneg::Pipeline;
use std::path::PathBuf;

/// An error caused by the user's input: printed on one line, exit code 2.
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

pub fn user(msg: impl Into<String>) -> anyhow::Error {
    UserError(msg.into()).into()
}

/// Library errors from bad input become user errors; others stay internal.
pub fn lib(e: reneg::Error) -> anyhow::Error {
    if e.is_user_error() {
        user(e.to_string())
    } else {
        anyhow::Error::new(e)
    }
}

pub fn is_user_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<UserError>().is_some())
}

/// `--device cpu` or `cuda[:N]` (CUDA builds only).
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse()
                        .map_err(|_| user(format!("--device {s}: expected cuda:N")))
                })
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(user(format!(
                    "--device {s}: this reneg was built without CUDA; rebuild with --features cuda or use --device cpu"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| user(format!("--device {s}: {e}")))
        }
        s => Err(user(format!("--device {s}: expected cpu or cuda:N"))),
    }
}

/// Checks `--precision` against the device, sets its matmul mode, and returns the weights'
/// dtype.
pub fn setup_precision(p: Precision, device: &Device) -> Result<DType> {
    p.check(device).map_err(lib)?;
    p.apply(device);
    Ok(p.weight_dtype())
}

/// Where the model comes from, shared by every command that loads one.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A diffusers folder, an original single-file .safetensors checkpoint, or a Hugging Face
    /// repo id already in the local hub cache (default: the built-in miniature-world model,
    /// assets/mini/pipeline).
    #[arg(long)]
    pub model: Option<String>,
    /// Never touch the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// For single-file checkpoints: a diffusers-style folder whose configs (unet/, vae/,
    /// text_encoder/, scheduler/, tokenizer/) replace the ones inferred from the tensors.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// For single-file checkpoints: epsilon or v_prediction (inferred otherwise).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// A textual-inversion embedding (A1111 .pt, emb_params .safetensors, diffusers
    /// learned_embeds; for SDXL a clip_l + clip_g .safetensors) that prompts and negative
    /// prompts may use by name, as NAME=FILE or FILE (the name is the file's stem); write the
    /// name as a word or as embedding:NAME. Repeat for several.
    #[arg(long = "embedding", value_name = "NAME=FILE")]
    pub embeddings: Vec<String>,
    /// A LoRA (kohya or diffusers/PEFT safetensors) merged into the UNet and text encoder(s)
    /// at load, FILE or FILE:SCALE (scale 1 by default); repeat for several.
    #[arg(long)]
    pub lora: Vec<String>,
    /// How prompts are read: plain (diffusers: cut at 75 tokens, brackets are text) or a1111
    /// (AUTOMATIC1111's emphasis (word:1.3), (word), [word], BREAK, and chunks of 75 tokens).
    #[arg(long, value_enum, default_value = "plain")]
    pub prompt_syntax: reneg::prompt_syntax::PromptSyntax,
    /// A diffusers AutoencoderKL folder to use instead of the model's VAE (e.g. sd-vae-ft-mse).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Leave out the text encoder's last N layers (diffusers' clip_skip; 1 is AUTOMATIC1111's
    /// "Clip skip 2"; SDXL's encoders read hidden_states[-(N + 2)], as diffusers').
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// A file of prompt encodings to reuse and extend (PixArt-α: T5-XXL, 19 GB in f32, is
    /// loaded only when a prompt is not in it, and each new encoding is added).
    #[arg(long)]
    pub text_cache: Option<PathBuf>,
    /// PixArt: the prompt length in tokens (diffusers' max_sequence_length; default 120, as
    /// PixArt-α; PixArt-Sigma's pipeline uses 300). Negatives must have as many rows.
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
}

impl ModelArgs {
    /// The model and its options as the library runs them.
    pub fn plan(&self) -> Result<reneg::run::model::ModelPlan> {
        Ok(reneg::run::model::ModelPlan {
            model: self.name()?,
            offline: self.offline,
            model_config: self.model_config.clone(),
            prediction_type: self.prediction_type.clone(),
            loras: self.lora.clone(),
            embeddings: self.embeddings.clone(),
            prompt_syntax: self.prompt_syntax,
            vae: self.vae.clone(),
            clip_skip: self.clip_skip,
            text_cache: self.text_cache.clone(),
            max_sequence_length: self.max_sequence_length,
        })
    }

    /// The `--model` value, or the built-in miniature-world pipeline (`builtin`).
    pub fn name(&self) -> Result<String> {
        match &self.model {
            Some(m) => Ok(m.clone()),
            None => Ok(builtin::mini_root()?.join("pipeline").display().to_string()),
        }
    }
}

/// SDXL's size conditioning, as diffusers' pipeline arguments (pixels).
#[derive(clap::Args, Clone, Default)]
pub struct SizeArgs {
    /// SDXL: the original_size it is conditioned on, HEIGHT,WIDTH (default: the image's).
    #[arg(long, value_parser = parse_pair)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL: the target_size it is conditioned on, HEIGHT,WIDTH (default: the image's).
    #[arg(long, value_parser = parse_pair)]
    pub target_size: Option<(usize, usize)>,
    /// SDXL: crops_coords_top_left, TOP,LEFT (default 0,0).
    #[arg(long, value_parser = parse_pair)]
    pub crops_coords_top_left: Option<(usize, usize)>,
}

impl SizeArgs {
    pub fn conditioning(&self) -> reneg::family::roles::SizeConditioning {
        reneg::family::roles::SizeConditioning {
            original: self.original_size,
            target: self.target_size,
            crops_top_left: self.crops_coords_top_left.unwrap_or((0, 0)),
        }
    }
}

/// `A,B` as two non-negative integers.
pub fn parse_pair(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("`{s}`: expected two integers as A,B (e.g. 1024,1024)");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// The sampler options of `generate` and `eval`.
#[derive(clap::Args, Clone)]
pub struct SamplerArgs {
    /// The sampler: ddim, euler, euler-a, dpm++2m, dpm++2m-karras, unipc or pndm (PLMS).
    /// Default: the class the model's scheduler_config.json names, as diffusers loads it
    /// (DDIM for the built-in model, and where the file names a sampler reneg lacks).
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<reneg::scheduler::SchedulerKind>,
    /// DDIM's eta: 0 is deterministic, 1 adds DDPM's variance (fresh noise per step, drawn
    /// from each image's seed). DDIM only. Default: 0; 1 for VideoCrafter2, as its script.
    #[arg(long)]
    pub eta: Option<f64>,
    /// diffusers' guidance_rescale, 0 to 1: rescales the guided prediction towards the
    /// prompt branch's standard deviation (Lin et al.; 0.7 for zero-terminal-SNR models).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
}

impl SamplerArgs {
    /// The flags as the library's sampler plan.
    pub fn plan(&self) -> reneg::run::eval::SamplerPlan {
        reneg::run::eval::SamplerPlan {
            scheduler: self.scheduler,
            eta: self.eta,
            guidance_rescale: self.guidance_rescale,
        }
    }

    /// Sets `sd`'s sampler, eta and guidance rescale from the flags; prints which sampler
    /// runs, and the model's note when reneg stands another sampler in for its class.
    pub fn apply(&self, sd: &mut Pipeline) -> Result<()> {
        if let Some(note) = self.plan().apply(sd).map_err(lib)? {
            eprintln!("note: {note}");
        }
        println!("sampler: {}", sd.scheduler.label());
        Ok(())
    }
}

pub fn parse_scheduler(s: &str) -> std::result::Result<reneg::scheduler::SchedulerKind, String> {
    s.parse()
}

pub fn load_model(m: &ModelArgs, dtype: DType, device: &Device) -> Result<Pipeline> {
    let plan = m.plan()?;
    let sd = plan.load(dtype, device).map_err(lib)?;
    // The model a command runs, first (it may be the built-in one, written on first use).
    println!("model: {}", plan.model);
    Ok(sd)
}

/// Per-sample adaptation settings, shared by `generate --reward` and `eval`'s `per-sample:`
/// negatives.
#[derive(clap::Args, Clone)]
pub struct AdaptArgs {
    /// Adaptation steps per image.
    #[arg(long, default_value_t = AdaptSettings::default().steps)]
    pub adapt_steps: usize,
    /// Stop adapting after this many steps without improvement.
    #[arg(long, default_value_t = AdaptSettings::default().patience)]
    pub adapt_patience: usize,
    /// Adaptation learning rate (Adam).
    #[arg(long, default_value_t = AdaptSettings::default().lr)]
    pub adapt_lr: f64,
    /// The adaptation's gradient step: staged (less memory) or one-pass (faster).
    #[arg(long, value_enum, default_value = "staged")]
    pub adapt_backward: reneg::train::step::Backward,
}

impl AdaptArgs {
    /// The flags as the library's adaptation settings.
    pub fn settings(&self) -> AdaptSettings {
        AdaptSettings {
            steps: self.adapt_steps,
            patience: self.adapt_patience,
            lr: self.adapt_lr,
            backward: self.adapt_backward,
        }
    }

    /// The adaptation for a sampler of `steps` steps.
    pub fn config(&self, steps: usize) -> reneg::train::per_sample::AdaptConfig {
        self.settings().config(steps)
    }
}

/// Creates the output folder (a user error naming it when that fails).
/// `--steps` checked against the model's scheduler before anything is written.
pub fn check_steps(sd: &mut Pipeline, steps: usize) -> Result<()> {
    sd.scheduler
        .set_timesteps(steps)
        .map_err(|e| user(format!("--steps {steps}: {e}")))
}

pub fn create_out_dir(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| {
        user(format!(
            "{}: cannot create output folder: {e}",
            out.display()
        ))
    })
}

/// `--height` / `--width` (default: the UNet's sample size times the VAE factor), checked to
/// be positive multiples of what the model's down-sampling needs.
pub fn image_size(
    sd: &Pipeline,
    height: Option<usize>,
    width: Option<usize>,
) -> Result<(usize, usize)> {
    sd.image_size(height, width).map_err(lib)
}

/// `--reward KIND --reward-model PATH` pairs, loaded, each with weight 1.
pub fn load_rewards(
    kinds: &[rewards::RewardArg],
    models: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<Vec<(Box<dyn reneg::reward::Reward>, f64)>> {
    if kinds.len() != models.len() {
        return Err(user("give one --reward-model per --reward"));
    }
    kinds
        .iter()
        .zip(models)
        .map(|(k, m)| Ok((k.load(m, dtype, device).map_err(lib)?, 1.0)))
        .collect()
}
