//! The training configuration: the paper's defaults, overridable from a TOML file and then
//! from command-line flags, resolved into one validated struct saved beside the result.

use crate::error::{Error, Result};
use crate::reward::load::RewardKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One reward in the objective: loss = -sum_i weight_i * mean(reward_i).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RewardSpec {
    pub kind: RewardKind,
    pub model: PathBuf,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Where the negative embedding starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// The text encoder's output for "" (the paper's start).
    Null,
    /// The text encoder's output for a negative prompt.
    Prompt(String),
    /// An embedding file.
    File(PathBuf),
}

impl Init {
    /// `null`, `prompt:TEXT` or a file path.
    pub fn parse(s: &str) -> Self {
        match s {
            "null" => Init::Null,
            _ => match s.strip_prefix("prompt:") {
                Some(t) => Init::Prompt(t.to_string()),
                None => Init::File(PathBuf::from(s)),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: String,
    pub rewards: Vec<RewardSpec>,
    pub prompts: PathBuf,
    #[serde(default)]
    pub val_prompts: Option<PathBuf>,
    #[serde(default = "d_init")]
    pub init: Init,
    pub out: PathBuf,
    /// Optimisation steps (each over `batch_size` samples).
    #[serde(default = "d_steps")]
    pub steps: u64,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Samples per optimisation step, by gradient accumulation.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Samples per forward/backward pass.
    #[serde(default = "d_micro")]
    pub micro_batch_size: usize,
    #[serde(default = "d_guidance")]
    pub guidance_scale: f64,
    /// Sampling steps of each trajectory.
    #[serde(default = "d_sampling")]
    pub sampling_steps: usize,
    /// The sampler (DDIM, as the paper trains; any other's x0 prediction works too).
    #[serde(default = "d_scheduler")]
    pub scheduler: crate::scheduler::SchedulerKind,
    /// DDIM's eta (0: deterministic).
    #[serde(default)]
    pub eta: f64,
    /// diffusers' guidance_rescale (0: plain guidance). Left out of the written config at 0,
    /// so the configs of runs from before it existed still resume.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guidance_rescale: f64,
    /// The gradient step is drawn uniformly from the last this many sampling steps.
    #[serde(default = "d_window")]
    pub grad_step_window: usize,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// Gradient-norm clipping (none by default).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Stop after this many non-finite losses or gradients in a row.
    #[serde(default = "d_bad")]
    pub max_bad_steps: u64,
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    /// Validate every this many steps (0: never).
    #[serde(default = "d_val")]
    pub val_every: u64,
    /// Seeds per validation prompt.
    #[serde(default = "d_val_seeds")]
    pub val_seeds: usize,
    /// How the gradient step's backward is arranged (`staged` or `one-pass`).
    #[serde(default)]
    pub backward: crate::train::step::Backward,
    /// Numeric precision (`f32`, `tf32`, `bf16`, `fp16`; see `crate::precision`).
    #[serde(default)]
    pub precision: crate::precision::Precision,
    /// Activation checkpointing of the gradient step (`off`, `on`, `auto`).
    #[serde(default)]
    pub checkpointing: crate::train::memory::Checkpointing,
    /// LoRAs merged into the model at load, `FILE` or `FILE:SCALE` (`crate::lora`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    /// A ControlNet (diffusers folder or original single file) the sampling and the gradient
    /// go through, with its conditioning image (the images' size follows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controlnet: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_image: Option<PathBuf>,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub controlnet_scale: f64,
    /// diffusers' guess mode for the ControlNet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guess_mode: bool,
    /// Frames per video, for a text-to-video model (required there, refused elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<usize>,
    /// PixArt: the prompt length in tokens (diffusers' max_sequence_length; 120 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<usize>,
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

fn d_init() -> Init {
    Init::Null
}
fn d_steps() -> u64 {
    4000
}
fn d_lr() -> f64 {
    5e-3
}
fn d_wd() -> f64 {
    0.01
}
fn d_batch() -> usize {
    64
}
fn d_micro() -> usize {
    1
}
fn d_guidance() -> f64 {
    7.5
}
fn d_sampling() -> usize {
    30
}
fn d_scheduler() -> crate::scheduler::SchedulerKind {
    crate::scheduler::SchedulerKind::Ddim
}
fn d_window() -> usize {
    10
}
fn d_bad() -> u64 {
    10
}
fn d_ckpt() -> u64 {
    100
}
fn d_val() -> u64 {
    200
}
fn d_val_seeds() -> usize {
    1
}

impl TrainConfig {
    /// Parses a TOML config (every key optional except the ones without a default).
    pub fn from_toml(text: &str, path: &Path) -> Result<toml::Table> {
        text.parse::<toml::Table>()
            .map_err(|e| Error::file(path, format!("invalid TOML: {e}")))
    }

    /// Builds the config from a TOML table (possibly empty) with `overrides` applied on top.
    pub fn resolve(mut table: toml::Table, overrides: toml::Table, source: &Path) -> Result<Self> {
        for (k, v) in overrides {
            table.insert(k, v);
        }
        let cfg: Self = table
            .try_into()
            .map_err(|e| Error::file(source, format!("invalid training config: {e}")))?;
        cfg.validate(source)?;
        Ok(cfg)
    }

    pub fn validate(&self, source: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::file(source, msg));
        if self.rewards.is_empty() {
            return bad(
                "no reward: give --reward and --reward-model (or [[rewards]] in the config)".into(),
            );
        }
        if self.batch_size == 0
            || self.micro_batch_size == 0
            || !self.batch_size.is_multiple_of(self.micro_batch_size)
        {
            return bad(format!(
                "batch_size {} must be a positive multiple of micro_batch_size {}",
                self.batch_size, self.micro_batch_size
            ));
        }
        if self.sampling_steps == 0
            || self.grad_step_window == 0
            || self.grad_step_window > self.sampling_steps
        {
            return bad(format!(
                "grad_step_window {} must be between 1 and sampling_steps {}",
                self.grad_step_window, self.sampling_steps
            ));
        }
        if self.steps == 0 || self.checkpoint_every == 0 {
            return bad("steps and checkpoint_every must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return bad(format!(
                "guidance_rescale must be between 0 and 1, got {}",
                self.guidance_rescale
            ));
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return bad(format!("eta must be between 0 and 1, got {}", self.eta));
        }
        if self.eta != 0.0 && self.scheduler != crate::scheduler::SchedulerKind::Ddim {
            return bad(format!(
                "eta {} is DDIM's; the scheduler is {}",
                self.eta, self.scheduler
            ));
        }
        if self.controlnet.is_some() != self.control_image.is_some() {
            return bad("controlnet and control_image go together: give both or neither".into());
        }
        if !self.controlnet_scale.is_finite() {
            return bad(format!(
                "controlnet_scale must be a number, got {}",
                self.controlnet_scale
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }

    /// The value each optional setting takes when neither the TOML file nor a flag gives it
    /// (the serde defaults above), by key: what `train --help` shows. Settings without a
    /// default value (the required ones, and those whose absence means "none") are left out.
    pub fn default_values() -> toml::Table {
        let minimal = "model = \"\"\nprompts = \"\"\nout = \"\"\nrewards = []\n";
        let Ok(cfg) = toml::from_str::<TrainConfig>(minimal) else {
            return toml::Table::new();
        };
        let mut t = toml::Table::try_from(&cfg).unwrap_or_default();
        for k in ["model", "prompts", "out", "rewards"] {
            t.remove(k);
        }
        t
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
