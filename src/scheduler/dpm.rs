//! DPM-Solver++ 2M (Lu et al. 2022) as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"`, `solver_order = 2`, `solver_type = "midpoint"`: a data
//! prediction (x0) multistep solver on the variance-preserving sample, first order at the
//! first step and (by default) at the last.

use super::config::{FinalSigma, SchedulerConfig};
use super::schedule::{PredictionType, Schedule};
use super::StepOutput;
use crate::error::Result;
use candle_core::Tensor;

/// (alpha_t, sigma_t) of the variance-preserving process at noise level `sigma`.
pub fn alpha_sigma(sigma: f32) -> (f64, f64) {
    let alpha = 1.0 / ((sigma as f64).powi(2) + 1.0).sqrt();
    (alpha, sigma as f64 * alpha)
}

/// log(alpha_t / sigma_t): +inf at sigma 0.
pub fn lambda(sigma: f32) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// The data prediction x0 from a model output at noise level `sigma` (diffusers'
/// `convert_model_output`). Differentiable.
pub fn x0(
    pt: PredictionType,
    sigma: f32,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<Tensor> {
    let (a, s) = alpha_sigma(sigma);
    Ok(match pt {
        PredictionType::Epsilon => ((sample - (model_output * s)?)? / a)?,
        PredictionType::VPrediction => ((sample * a)? - (model_output * s)?)?,
        PredictionType::Sample => model_output.clone(),
    })
}

/// The solver's memory: the last two data predictions and how many steps have run.
#[derive(Debug, Clone, Default)]
pub struct DpmState {
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmState {
    pub fn step(
        &mut self,
        cfg: &SchedulerConfig,
        sched: &Schedule,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let n = sched.timesteps.len();
        let lower_order_final = i == n - 1
            && (cfg.euler_at_final
                || (cfg.lower_order_final && n < 15)
                || cfg.final_sigmas_type == FinalSigma::Zero);
        let s = &sched.sigmas;
        let m0 = x0(cfg.prediction_type, s[i], model_output, sample)?;
        self.outputs.push(m0.clone());
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
        let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
        let (_, sigma_s0) = alpha_sigma(s[i]);
        let h = lambda(s[i + 1]) - lambda(s[i]);
        // alpha_t (e^-h - 1): the weight of the data prediction.
        let w = alpha_t * ((-h).exp() - 1.0);
        let prev = if self.lower_order_nums < 1 || lower_order_final {
            ((sample * (sigma_t / sigma_s0))? - (&m0 * w)?)?
        } else {
            let m1 = &self.outputs[0];
            let r0 = (lambda(s[i]) - lambda(s[i - 1])) / h;
            // D1 = (m0 - m1) / r0; midpoint: x_t = ... - w D0 - w / 2 D1.
            let d1 = ((&m0 - m1)? / r0)?;
            (((sample * (sigma_t / sigma_s0))? - (&m0 * w)?)? - (d1 * (0.5 * w))?)?
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: m0,
        })
    }
}
