//! DDIM (Song et al. 2020), mirroring diffusers' `DDIMScheduler` (diffusers 0.42.1) with eta 0:
//! the beta schedules, timestep spacings and prediction types Stable Diffusion 1.x/2.x use.
//! The predicted x0 of a step is returned so callers can decode it (ReNeg's reward step).

use crate::error::{read_json, Error, Result};
use candle_core::Tensor;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// The keys of `scheduler_config.json` that DDIM uses.
#[derive(Debug, Clone, Deserialize)]
pub struct DdimConfig {
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_schedule")]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_prediction")]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "d_spacing")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
}

fn d_train_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_prediction() -> PredictionType {
    PredictionType::Epsilon
}
fn d_spacing() -> TimestepSpacing {
    TimestepSpacing::Leading
}

/// Scheduler classes whose config describes the same diffusion process: a pipeline saved
/// with one of them is sampled with DDIM, as `DDIMScheduler.from_config(...)` does.
const COMPATIBLE: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "DDPMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
];

impl DdimConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(read_json(path)?, path)
    }

    /// Parses and validates a config given as JSON; `path` names it in errors.
    pub fn from_value(raw: serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(raw)
            .map_err(|e| Error::file(path, format!("invalid scheduler config: {e}")))?;
        if let Some(name) = &cfg.class_name {
            if !COMPATIBLE.contains(&name.as_str()) {
                return Err(Error::unsupported(
                    path,
                    "_class_name",
                    name,
                    "not a Stable Diffusion noise scheduler; use DDIMScheduler",
                ));
            }
        }
        if cfg.num_train_timesteps == 0 {
            // Found by the fuzzer (tests/fuzz.rs): no training timesteps indexed an empty table.
            return Err(Error::unsupported(
                path,
                "num_train_timesteps",
                0,
                "must be at least 1",
            ));
        }
        if cfg.thresholding {
            return Err(Error::unsupported(
                path,
                "thresholding",
                true,
                "only false is supported",
            ));
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                return Err(Error::unsupported(
                    path,
                    "trained_betas",
                    format!("{} values", b.len()),
                    "needs num_train_timesteps values",
                ));
            }
        }
        Ok(cfg)
    }
}

impl Default for DdimConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

/// One DDIM update.
pub struct StepOutput {
    /// The sample at the previous (less noisy) timestep.
    pub prev_sample: Tensor,
    /// The model's estimate of the clean latents.
    pub pred_original_sample: Tensor,
}

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    cfg: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
}

impl DdimScheduler {
    pub fn new(cfg: DdimConfig) -> Self {
        let n = cfg.num_train_timesteps;
        // diffusers builds betas in float32; so do we, to match it to the last bit.
        let mut betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.iter().map(|&v| v as f32).collect(),
            (None, BetaSchedule::Linear) => linspace_f32(cfg.beta_start, cfg.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredCosCapV2) => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        // torch.cumprod accumulates float32 in double on the CPU.
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1f64;
        for b in &betas {
            acc *= (1.0f32 - b) as f64;
            alphas_cumprod.push(acc as f32);
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Self {
            cfg,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: vec![],
            num_inference_steps: 0,
        }
    }

    pub fn config(&self) -> &DdimConfig {
        &self.cfg
    }

    /// Chooses the `steps` timesteps to sample at, largest first (diffusers' `set_timesteps`).
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let t = self.cfg.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error::Invalid(format!(
                "number of inference steps must be between 1 and num_train_timesteps = {t}, got {steps}"
            )));
        }
        let ts: Vec<i64> = match self.cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let last = (t - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|i| {
                        let v = if steps == 1 {
                            0.0
                        } else {
                            last * i as f64 / (steps - 1) as f64
                        };
                        round_half_even(v) as i64
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.cfg.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // np.round(np.arange(t, 0, -t / steps)) - 1
                let ratio = t as f64 / steps as f64;
                let count = (t as f64 / ratio).ceil() as usize;
                (0..count)
                    .map(|i| round_half_even(t as f64 - i as f64 * ratio) as i64 - 1)
                    .collect()
            }
        };
        if let Some(&bad) = ts.iter().find(|&&v| v < 0 || v as usize >= t) {
            return Err(Error::Invalid(format!(
                "timestep {bad} is out of range for {steps} steps with steps_offset = {}",
                self.cfg.steps_offset
            )));
        }
        self.timesteps = ts.into_iter().map(|v| v as usize).collect();
        self.num_inference_steps = steps;
        Ok(())
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The coefficients (sqrt(a_t), sqrt(1 - a_t)) of timestep `t`.
    fn alpha(&self, t: usize) -> (f64, f64) {
        let a = self.alphas_cumprod[t] as f64;
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// The predicted clean sample x0 and the implied noise, from a model output at `t`.
    /// Differentiable in `model_output` and `sample`.
    pub fn predict(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (sa, sb) = self.alpha(t);
        let (x0, eps) = match self.cfg.prediction_type {
            PredictionType::Epsilon => (
                ((sample - (model_output * sb)?)? / sa)?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                ((sample * sa)? - (model_output * sb)?)?,
                ((model_output * sa)? + (sample * sb)?)?,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                ((sample - (model_output * sa)?)? / sb)?,
            ),
        };
        let x0 = if self.cfg.clip_sample {
            let r = self.cfg.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        Ok((x0, eps))
    }

    /// The predicted x0 alone (ReNeg decodes it for the reward).
    pub fn pred_original_sample(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.predict(model_output, t, sample)?.0)
    }

    /// One deterministic (eta 0) DDIM step from timestep `t`.
    pub fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor) -> Result<StepOutput> {
        if self.num_inference_steps == 0 {
            return Err(Error::Invalid("call set_timesteps before step".into()));
        }
        let (x0, eps) = self.predict(model_output, t, sample)?;
        let stride = self.cfg.num_train_timesteps / self.num_inference_steps;
        let a_prev = match t.checked_sub(stride) {
            Some(p) => self.alphas_cumprod[p] as f64,
            None => self.final_alpha_cumprod as f64,
        };
        let prev = ((&x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: computed in f32, the second half filled
/// from the end, as ATen does.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}

/// Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    let sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|&b| {
            acc *= 1.0 - b as f64;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_bar[0], *sqrt_bar.last().unwrap());
    let bar: Vec<f64> = sqrt_bar
        .iter()
        .map(|s| ((s - last) * first / (first - last)).powi(2))
        .collect();
    let mut out = vec![(1.0 - bar[0]) as f32];
    for i in 1..bar.len() {
        out.push((1.0 - bar[i] / bar[i - 1]) as f32);
    }
    out
}
