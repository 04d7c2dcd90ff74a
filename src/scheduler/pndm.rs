//! PNDM's pseudo linear multistep mode (PLMS; Liu et al. 2022) as diffusers' `PNDMScheduler`
//! with `skip_prk_steps = true`, as Stable Diffusion ships it: Adams-Bashforth combinations of
//! up to four past noise predictions, the first step taken twice (a step and a half step back).

use super::config::SchedulerConfig;
use super::ddim;
use super::schedule::{PredictionType, Schedule};
use super::StepOutput;
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, Default)]
pub struct PndmState {
    /// Past model outputs, oldest first (at most four).
    ets: Vec<Tensor>,
    counter: usize,
    /// The sample of the first step, which its repeat starts from again.
    cur_sample: Option<Tensor>,
}

impl PndmState {
    pub fn step(
        &mut self,
        cfg: &SchedulerConfig,
        sched: &Schedule,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        // Reported only: the x0 this step's own output implies (ReNeg's gradient uses
        // `Scheduler::pred_original_sample`, which needs no state).
        let x0 = ddim::predict(
            cfg,
            sched,
            model_output,
            sched.timesteps[i] as usize,
            sample,
            false,
        )?
        .0;
        let mut t = sched.timesteps[i] as i64;
        let stride = sched.stride as i64;
        let mut prev_t = t - stride;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += stride;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.clone();
        let combined = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            ((model_output + &e[0])? / 2.0)?
        } else if k == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if k == 3 {
            ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            (((((&e[3] * 55.0)? - (&e[2] * 59.0)?)? + (&e[1] * 37.0)?)? - (&e[0] * 9.0)?)? / 24.0)?
        };
        let prev = prev_sample(cfg, sched, &sample, t, prev_t, &combined)?;
        self.counter += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

/// The PNDM paper's formula (9): from `t` to `prev_t` with the combined model output.
fn prev_sample(
    cfg: &SchedulerConfig,
    sched: &Schedule,
    sample: &Tensor,
    t: i64,
    prev_t: i64,
    model_output: &Tensor,
) -> Result<Tensor> {
    let a_t = sched.alphas_cumprod[t as usize] as f64;
    let a_prev = if prev_t >= 0 {
        sched.alphas_cumprod[prev_t as usize] as f64
    } else {
        sched.final_alpha_cumprod as f64
    };
    let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
    let eps = match cfg.prediction_type {
        PredictionType::VPrediction => ((model_output * a_t.sqrt())? + (sample * b_t.sqrt())?)?,
        _ => model_output.clone(),
    };
    let coeff = (a_prev / a_t).sqrt();
    let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
    Ok(((sample * coeff)? - (eps * ((a_prev - a_t) / denom))?)?)
}
