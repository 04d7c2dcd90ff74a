//! UniPC (Zhao et al. 2023) as diffusers' `UniPCMultistepScheduler` with its defaults:
//! second order, data prediction, the `bh2` (or `bh1`) B(h), a predictor at every step and
//! the UniC corrector applied to the sample before each step after the first.

use super::config::SchedulerConfig;
use super::dpm::{alpha_sigma, lambda, x0};
use super::schedule::Schedule;
use super::StepOutput;
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, Default)]
pub struct UniPcState {
    /// The last two data predictions, oldest first.
    outputs: Vec<Tensor>,
    /// The sample the previous predictor started from (after its correction).
    last_sample: Option<Tensor>,
    lower_order_nums: usize,
    /// The order of the previous predictor, which the corrector repeats.
    this_order: usize,
}

/// hh = -h (data prediction), e^hh - 1, and B(h).
fn phis(cfg: &SchedulerConfig, h: f64) -> (f64, f64, f64) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = if cfg.unipc_bh2 { hh.exp_m1() } else { hh };
    (hh, h_phi_1, b_h)
}

impl UniPcState {
    pub fn step(
        &mut self,
        cfg: &SchedulerConfig,
        sched: &Schedule,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let s = &sched.sigmas;
        let n = sched.timesteps.len();
        let m_t = x0(cfg.prediction_type, s[i], model_output, sample)?;
        let mut sample = sample.clone();
        if i > 0 && !cfg.disable_corrector.contains(&(i - 1)) {
            if let Some(last) = self.last_sample.take() {
                sample = self.correct(cfg, s, &m_t, &last, i)?;
            }
        }
        self.outputs.push(m_t.clone());
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
        let order = if cfg.lower_order_final {
            2.min(n - i)
        } else {
            2
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predict(cfg, s, &sample, i)?;
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: m_t,
        })
    }

    /// UniP from step i to i + 1 at order `this_order`.
    fn predict(&self, cfg: &SchedulerConfig, s: &[f32], x: &Tensor, i: usize) -> Result<Tensor> {
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
        let (_, sigma_s0) = alpha_sigma(s[i]);
        let h = lambda(s[i + 1]) - lambda(s[i]);
        let (_, h_phi_1, b_h) = phis(cfg, h);
        let base = ((x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        if self.this_order < 2 {
            return Ok(base);
        }
        let m1 = &self.outputs[0];
        let rk = (lambda(s[i - 1]) - lambda(s[i])) / h;
        let d1 = ((m1 - m0)? / rk)?;
        // Second order: rho_p = 1/2.
        Ok((base - (d1 * (alpha_t * b_h * 0.5))?)?)
    }

    /// UniC: corrects the sample at step i (predicted from `last` at step i - 1) with the
    /// model's data prediction `m_t` there, at the previous predictor's order.
    fn correct(
        &self,
        cfg: &SchedulerConfig,
        s: &[f32],
        m_t: &Tensor,
        last: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (alpha_t, sigma_t) = alpha_sigma(s[i]);
        let (_, sigma_s0) = alpha_sigma(s[i - 1]);
        let h = lambda(s[i]) - lambda(s[i - 1]);
        let (hh, h_phi_1, b_h) = phis(cfg, h);
        let base = ((last * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        let d1_t = (m_t - m0)?;
        if self.this_order < 2 {
            // First order: rho_c = 1/2.
            return Ok((base - (d1_t * (alpha_t * b_h * 0.5))?)?);
        }
        let m1 = &self.outputs[0];
        let rk = (lambda(s[i - 2]) - lambda(s[i - 1])) / h;
        let d1 = ((m1 - m0)? / rk)?;
        // Solve [[1, 1], [rk, 1]] rho = b with b_k = h phi_k(h) k! / B(h).
        let h_phi_k1 = h_phi_1 / hh - 1.0;
        let b1 = h_phi_k1 / b_h;
        let h_phi_k2 = h_phi_k1 / hh - 0.5;
        let b2 = h_phi_k2 * 2.0 / b_h;
        let rho0 = (b1 - b2) / (1.0 - rk);
        let rho1 = b1 - rho0;
        let corr = ((d1 * rho0)? + (d1_t * rho1)?)?;
        Ok((base - (corr * (alpha_t * b_h))?)?)
    }
}
