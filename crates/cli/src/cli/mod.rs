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
    /// learned_embeds) that prompts and negative prompts may use by name, as NAME=FILE or FILE
    /// (the name is the file's stem); write the name as a word or as embedding:NAME. Repeat
    /// for several.
    #[arg(long = "embedding", value_name = "NAME=FILE")]
    pub embeddings: Vec<String>,
    /// A LoRA (kohya or diffusers/PEFT safetensors) merged into the UNet and text encoder at
    /// load, FILE or FILE:SCALE (scale 1 by default); repeat for several.
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
    /// "Clip skip 2").
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
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
        })
    }

    /// The options besides the model that change its images, as `key=value` lines (empty
    /// when all are at their defaults): recorded in an evaluation's manifest.
    pub fn options(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lora.iter().map(|l| format!("lora={l}")).collect();
        v.extend(self.embeddings.iter().map(|e| format!("embedding={e}")));
        if let Some(vae) = &self.vae {
            v.push(format!("vae={}", vae.display()));
        }
        if self.clip_skip != 0 {
            v.push(format!("clip_skip={}", self.clip_skip));
        }
        if self.prompt_syntax != reneg::prompt_syntax::PromptSyntax::Plain {
            v.push("prompt_syntax=a1111".into());
        }
        v
    }

    /// The files besides the model that change its images, by role: LoRAs, textual
    /// inversions, the VAE, a single file's config folder (for an evaluation's manifest).
    pub fn files(&self) -> Result<Vec<(&'static str, PathBuf)>> {
        let mut v = vec![];
        for spec in &self.lora {
            let (file, _) = reneg::lora::parse_spec(spec).map_err(user)?;
            v.push(("lora", file));
        }
        for spec in &self.embeddings {
            v.push((
                "textual inversion",
                reneg::embedding::textual_inversion::parse_spec(spec).1,
            ));
        }
        v.extend(self.vae.iter().map(|p| ("vae", p.clone())));
        v.extend(
            self.model_config
                .iter()
                .map(|p| ("model config", p.clone())),
        );
        Ok(v)
    }

    /// The `--model` value, or the built-in miniature-world pipeline (`builtin`).
    pub fn name(&self) -> Result<String> {
        match &self.model {
            Some(m) => Ok(m.clone()),
            None => Ok(builtin::mini_root()?.join("pipeline").display().to_string()),
        }
    }
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
    /// from each image's seed). DDIM only.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// diffusers' guidance_rescale, 0 to 1: rescales the guided prediction towards the
    /// prompt branch's standard deviation (Lin et al.; 0.7 for zero-terminal-SNR models).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
}

impl SamplerArgs {
    /// Sets `sd`'s sampler, eta and guidance rescale from the flags.
    pub fn apply(&self, sd: &mut Pipeline) -> Result<()> {
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(user(format!(
                "--guidance-rescale {}: expected a value from 0 to 1 (0.7 for zero-terminal-SNR models)",
                self.guidance_rescale
            )));
        }
        set_sampler(sd, self.scheduler, self.eta)?;
        sd.guidance_rescale = self.guidance_rescale;
        Ok(())
    }

    /// `key=value` lines for an evaluation's manifest (empty at the defaults).
    pub fn options(&self) -> Vec<String> {
        let mut v = vec![];
        if let Some(k) = self.scheduler {
            v.push(format!("scheduler={k}"));
        }
        if self.eta != 0.0 {
            v.push(format!("eta={}", self.eta));
        }
        if self.guidance_rescale != 0.0 {
            v.push(format!("guidance_rescale={}", self.guidance_rescale));
        }
        v
    }
}

pub fn parse_scheduler(s: &str) -> std::result::Result<reneg::scheduler::SchedulerKind, String> {
    s.parse()
}

/// Switches `sd` to sampler `kind` (None: the model's own) with DDIM's `eta`; prints which
/// sampler runs, and the model's note when reneg stands another sampler in for its class.
pub fn set_sampler(
    sd: &mut Pipeline,
    kind: Option<reneg::scheduler::SchedulerKind>,
    eta: f64,
) -> Result<()> {
    if let Some(note) = sd.set_sampler(kind, eta).map_err(lib)? {
        eprintln!("note: {note}");
    }
    println!("sampler: {}", sd.scheduler.label());
    Ok(())
}

/// Refuses, before anything is written, prompts that `sd` could not encode (an
/// `embedding:NAME` with no such embedding loaded).
pub fn check_prompts(sd: &Pipeline, prompts: &[reneg::prompts::Prompt]) -> Result<()> {
    for p in prompts {
        sd.check_prompt(&p.text).map_err(lib)?;
    }
    Ok(())
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
    #[arg(long, default_value_t = 10)]
    pub adapt_steps: usize,
    /// Stop adapting after this many steps without improvement.
    #[arg(long, default_value_t = 3)]
    pub adapt_patience: usize,
    /// Adaptation learning rate (Adam).
    #[arg(long, default_value_t = 5e-3)]
    pub adapt_lr: f64,
    /// The adaptation's gradient step: staged (less memory) or one-pass (faster).
    #[arg(long, value_enum, default_value = "staged")]
    pub adapt_backward: reneg::train::step::Backward,
}

impl AdaptArgs {
    /// The adaptation for a sampler of `steps` steps (the gradient step drawn from the last 10).
    pub fn config(&self, steps: usize) -> reneg::train::per_sample::AdaptConfig {
        reneg::train::per_sample::AdaptConfig {
            steps: self.adapt_steps,
            patience: self.adapt_patience,
            lr: self.adapt_lr,
            grad_step_window: steps.min(10),
        }
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
    let default_px = sd.default_size();
    let (h, w) = (height.unwrap_or(default_px), width.unwrap_or(default_px));
    let factor = sd.size_multiple();
    if h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
        return Err(user(format!(
            "--height {h} / --width {w}: both must be positive multiples of {factor} for this model"
        )));
    }
    Ok((h, w))
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
