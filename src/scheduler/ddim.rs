//! DDIM (Song et al. 2020) as diffusers' `DDIMScheduler`: deterministic at eta 0, adding
//! eta-scaled DDPM variance otherwise. PNDM shares its x0 prediction.

use super::config::SchedulerConfig;
use super::schedule::{PredictionType, Schedule};
use super::{NoiseFn, StepOutput};
use crate::error::Result;
use candle_core::Tensor;

/// The predicted clean sample x0 and the implied noise from a model output at integer
/// timestep `t` on a variance-preserving `sample`, x0 clamped when `clip` and the config's
/// `clip_sample` say so (DDIM does, PNDM does not). Differentiable in both tensors.
pub fn predict(
    cfg: &SchedulerConfig,
    sched: &Schedule,
    model_output: &Tensor,
    t: usize,
    sample: &Tensor,
    clip: bool,
) -> Result<(Tensor, Tensor)> {
    let a = sched.alphas_cumprod[t] as f64;
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    let (x0, eps) = match cfg.prediction_type {
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
    // lvdm's use_scale: its forward process scales x0 by s(t), so the network's x0 is s(t) x0.
    let x0 = match scale_at(cfg, t) {
        Some(s) => (x0 / s)?,
        None => x0,
    };
    let x0 = if clip && cfg.clip_sample {
        let r = cfg.clip_sample_range;
        x0.clamp(-r, r)?
    } else {
        x0
    };
    Ok((x0, eps))
}

/// DDIM step `i`: to the previous timestep (`t - T / steps`), with the noise direction
/// shrunk by the added variance when eta > 0.
pub fn step(
    cfg: &SchedulerConfig,
    sched: &Schedule,
    eta: f64,
    model_output: &Tensor,
    i: usize,
    sample: &Tensor,
    noise: &mut NoiseFn<'_>,
) -> Result<StepOutput> {
    let t = sched.timesteps[i] as usize;
    let (x0, eps) = predict(cfg, sched, model_output, t, sample, true)?;
    let a_t = sched.alphas_cumprod[t] as f64;
    let prev_t = t.checked_sub(sched.stride);
    let a_prev = match prev_t {
        Some(p) => sched.alphas_cumprod[p] as f64,
        None => sched.final_alpha_cumprod as f64,
    };
    // lvdm: the next latent carries the scale of the previous timestep (s[0] after the last).
    let s_prev = scale_at(cfg, prev_t.unwrap_or(0)).unwrap_or(1.0);
    let variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
    let std_dev = eta * variance.sqrt();
    let direction = (eps * (1.0 - a_prev - std_dev * std_dev).sqrt())?;
    let mut prev = ((&x0 * (a_prev.sqrt() * s_prev))? + direction)?;
    if eta > 0.0 {
        let z = noise(i, model_output.dims())?.to_dtype(prev.dtype())?;
        prev = (prev + (z * std_dev)?)?;
    }
    Ok(StepOutput {
        prev_sample: prev,
        pred_original_sample: x0,
    })
}

/// lvdm's `scale_arr` at timestep `t` (as f32, as its sampler's coefficients), when the process
/// has one.
fn scale_at(cfg: &SchedulerConfig, t: usize) -> Option<f64> {
    let s = cfg.tables.as_ref()?.scale.as_ref()?;
    Some(s[t] as f64)
}
