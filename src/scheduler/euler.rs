//! Euler and Euler ancestral (Karras et al. 2022, k-diffusion) as diffusers'
//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`: the sample lives in sigma
//! space (x0 + sigma * noise) and the UNet sees it divided by sqrt(sigma^2 + 1).

use super::config::SchedulerConfig;
use super::schedule::{PredictionType, Schedule};
use super::{NoiseFn, StepOutput};
use crate::error::Result;
use candle_core::Tensor;

/// x0 from a model output at noise level `sigma` on a sigma-space `sample`. Differentiable.
pub fn x0(
    pt: PredictionType,
    sigma: f64,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<Tensor> {
    Ok(match pt {
        PredictionType::Epsilon => (sample - (model_output * sigma)?)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            ((model_output * (-sigma / s2.sqrt()))? + (sample / s2)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// Euler step `i` (no churn: diffusers' default `s_churn = 0`).
pub fn step(
    cfg: &SchedulerConfig,
    sched: &Schedule,
    model_output: &Tensor,
    i: usize,
    sample: &Tensor,
) -> Result<StepOutput> {
    let (sigma, next) = (sched.sigmas[i] as f64, sched.sigmas[i + 1] as f64);
    let x0 = x0(cfg.prediction_type, sigma, model_output, sample)?;
    // derivative (sample - x0) / sigma times dt = next - sigma.
    let derivative = ((sample - &x0)? / sigma)?;
    let prev = (sample + (derivative * (next - sigma))?)?;
    Ok(StepOutput {
        prev_sample: prev,
        pred_original_sample: x0,
    })
}

/// Euler ancestral step `i`: down to sigma_down deterministically, then fresh noise of
/// standard deviation sigma_up, so the marginal is at the next sigma.
pub fn step_ancestral(
    cfg: &SchedulerConfig,
    sched: &Schedule,
    model_output: &Tensor,
    i: usize,
    sample: &Tensor,
    noise: &mut NoiseFn<'_>,
) -> Result<StepOutput> {
    let (from, to) = (sched.sigmas[i] as f64, sched.sigmas[i + 1] as f64);
    let x0 = x0(cfg.prediction_type, from, model_output, sample)?;
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    let derivative = ((sample - &x0)? / from)?;
    let prev = (sample + (derivative * (down - from))?)?;
    let z = noise(i, model_output.dims())?.to_dtype(prev.dtype())?;
    let prev = (prev + (z * up)?)?;
    Ok(StepOutput {
        prev_sample: prev,
        pred_original_sample: x0,
    })
}
