//! The noise schedule every sampler shares: betas and alpha-bar from the config, and for one
//! run its timesteps and, for the samplers that work in sigma space, its sigmas, computed as
//! diffusers computes them (float32 tables, numpy's float64 interpolation).

use super::config::{FinalSigma, SchedulerConfig, SchedulerKind};
// The config's values, here by their old path too (the schedule reads the config; the config
// never reads the schedule).
pub use super::config::{BetaSchedule, PredictionType, TimestepSpacing};
use crate::error::{Error, Result};

/// The schedule of one config, and the timesteps and sigmas of the current run.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub alphas_cumprod: Vec<f32>,
    /// alpha-bar after the last step (DDIM, PNDM).
    pub final_alpha_cumprod: f32,
    /// The UNet's time input at each step, largest first.
    pub timesteps: Vec<f64>,
    /// sigma = sqrt((1 - alpha-bar) / alpha-bar) at each step, and the one after the last
    /// (Euler, DPM++, UniPC; empty for DDIM and PNDM).
    pub sigmas: Vec<f32>,
    /// Training steps between consecutive timesteps (DDIM's and PNDM's previous timestep).
    pub stride: usize,
}

impl Schedule {
    pub fn new(cfg: &SchedulerConfig) -> Self {
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
        // A model that ships its tables (lvdm) samples with them, not with the formulas.
        if let Some(t) = &cfg.tables {
            alphas_cumprod.clone_from(&t.alphas_cumprod);
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: vec![],
            sigmas: vec![],
            stride: 0,
        }
    }

    /// The float32 sigma table of training, one per training timestep (torch computes it
    /// from float32 alpha-bar).
    fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0f32 - a) / a).sqrt())
            .collect()
    }

    /// diffusers' `set_timesteps(steps)` of `kind`.
    pub fn set_timesteps(
        &mut self,
        cfg: &SchedulerConfig,
        kind: SchedulerKind,
        steps: usize,
    ) -> Result<()> {
        let t = cfg.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error::Invalid(format!(
                "number of inference steps must be between 1 and num_train_timesteps = {t}, got {steps}"
            )));
        }
        if t < 2 && !matches!(kind, SchedulerKind::Ddim | SchedulerKind::Pndm) {
            return Err(Error::Invalid(format!(
                "{} needs at least 2 training timesteps to interpolate sigmas, the config has {t}",
                kind.label()
            )));
        }
        self.stride = t / steps;
        let offset = cfg.steps_offset as f64;
        let (timesteps, sigmas) = match kind {
            SchedulerKind::Ddim => {
                let ts = ddim_timesteps(cfg, steps);
                if let Some(&last) = ts.first().filter(|&&v| v >= t as f64) {
                    // lvdm indexes alphas_cumprod[1000] here and crashes.
                    return Err(Error::Invalid(format!(
                        "with {steps} steps this sampler's uniform spacing visits timestep {last}, past the schedule's last ({}); VideoCrafter's own sampler fails the same way: choose another step count (50 as its script, 25, 30...)",
                        t - 1
                    )));
                }
                (ts, vec![])
            }
            SchedulerKind::Pndm => {
                // PLMS: the leading or spaced timesteps, with the second-smallest repeated (its
                // first step is taken twice, the second time as a half step back).
                let mut ts = ddim_timesteps(cfg, steps);
                ts.reverse();
                let mut plms: Vec<f64> = ts[..ts.len() - 1].to_vec();
                if ts.len() >= 2 {
                    plms.push(ts[ts.len() - 2]);
                }
                plms.push(ts[ts.len() - 1]);
                plms.reverse();
                (plms, vec![])
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let ts: Vec<f64> = match cfg.timestep_spacing {
                    TimestepSpacing::Linspace => {
                        // np.linspace(0, T - 1, steps, dtype=float32)[::-1]
                        let mut v: Vec<f64> = linspace_np(0.0, (t - 1) as f64, steps)
                            .into_iter()
                            .map(|x| x as f32 as f64)
                            .collect();
                        v.reverse();
                        v
                    }
                    TimestepSpacing::Leading | TimestepSpacing::Uniform => {
                        let ratio = t / steps;
                        (0..steps)
                            .rev()
                            .map(|i| (i * ratio) as f32 as f64 + offset)
                            .collect()
                    }
                    TimestepSpacing::Trailing => trailing(t, steps)
                        .into_iter()
                        .map(|v| (v as f32 - 1.0) as f64)
                        .collect(),
                };
                let table = self.train_sigmas();
                let mut sig: Vec<f64> = ts.iter().map(|&x| interp(x, &table)).collect();
                let mut ts = ts;
                if kind == SchedulerKind::Euler && cfg.use_karras_sigmas {
                    let (lo, hi) = (sig[sig.len() - 1], sig[0]);
                    sig = karras(cfg, lo, hi, steps);
                    let logs = log_table(&table);
                    ts = sig.iter().map(|&s| sigma_to_t(s, &logs)).collect();
                }
                let last = match (kind, cfg.final_sigmas_type) {
                    (SchedulerKind::Euler, FinalSigma::SigmaMin) => table[0] as f64,
                    _ => 0.0,
                };
                sig.push(last);
                // Timesteps are stored as float32.
                let ts = ts.into_iter().map(|x| x as f32 as f64).collect();
                (ts, sig.into_iter().map(|s| s as f32).collect())
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::UniPc => {
                let ts: Vec<f64> = match cfg.timestep_spacing {
                    TimestepSpacing::Linspace => {
                        let mut v: Vec<f64> = linspace_np(0.0, (t - 1) as f64, steps + 1)
                            .into_iter()
                            .map(round_half_even)
                            .collect();
                        v.reverse();
                        v.pop();
                        v
                    }
                    TimestepSpacing::Leading | TimestepSpacing::Uniform => {
                        let ratio = t / (steps + 1);
                        (1..=steps)
                            .rev()
                            .map(|i| (i * ratio) as f64 + offset)
                            .collect()
                    }
                    TimestepSpacing::Trailing => {
                        trailing(t, steps).into_iter().map(|v| v - 1.0).collect()
                    }
                };
                let table = self.train_sigmas();
                if cfg.use_karras_sigmas {
                    let (lo, hi) = (table[0] as f64, table[t - 1] as f64);
                    let sig = karras(cfg, lo, hi, steps);
                    let logs = log_table(&table);
                    let ts: Vec<f64> = sig
                        .iter()
                        .map(|&s| {
                            let v = sigma_to_t(s, &logs);
                            if cfg.beta_schedule == BetaSchedule::SquaredCosCapV2
                                && kind != SchedulerKind::UniPc
                            {
                                v
                            } else {
                                round_half_even(v)
                            }
                        })
                        // int64 timesteps.
                        .map(|v| v.trunc())
                        .collect();
                    let last = match cfg.final_sigmas_type {
                        FinalSigma::Zero => 0.0,
                        FinalSigma::SigmaMin if kind == SchedulerKind::UniPc => sig[sig.len() - 1],
                        FinalSigma::SigmaMin => table[0] as f64,
                    };
                    let mut sig = sig;
                    sig.push(last);
                    (ts, sig.into_iter().map(|s| s as f32).collect())
                } else {
                    let mut sig: Vec<f64> = ts.iter().map(|&x| interp(x, &table)).collect();
                    sig.push(match cfg.final_sigmas_type {
                        FinalSigma::Zero => 0.0,
                        FinalSigma::SigmaMin => table[0] as f64,
                    });
                    (ts, sig.into_iter().map(|s| s as f32).collect())
                }
            }
        };
        // `contains` also refuses NaN, which a plain comparison lets through (found by the
        // fuzzer's timestep property: a beta_start of 1e-300 rounds 1 - beta to 1 in f32, a
        // zero sigma, and Karras sigmas' log-interpolation then gives NaN timesteps).
        if let Some(&bad) = timesteps.iter().find(|&&v| !(0.0..t as f64).contains(&v)) {
            return Err(Error::Invalid(format!(
                "timestep {bad} is out of range for {steps} steps with steps_offset = {}; check beta_start, beta_end and trained_betas",
                cfg.steps_offset
            )));
        }
        if sigmas.iter().any(|s| !s.is_finite()) {
            return Err(Error::Invalid(format!(
                "the noise schedule gives non-finite sigmas for {steps} steps; check beta_start, beta_end and trained_betas (each beta in (0, 1))"
            )));
        }
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }
}

/// DDIM's (and PNDM's) integer timesteps, largest first.
fn ddim_timesteps(cfg: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
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
                    round_half_even(v)
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(t, steps).into_iter().map(|v| v - 1.0).collect(),
        TimestepSpacing::Uniform => (0..t)
            .step_by((t / steps).max(1))
            .rev()
            .map(|v| (v + cfg.steps_offset) as f64)
            .collect(),
    }
}

/// `np.round(np.arange(t, 0, -t / steps))`.
fn trailing(t: usize, steps: usize) -> Vec<f64> {
    let ratio = t as f64 / steps as f64;
    let count = (t as f64 / ratio).ceil() as usize;
    (0..count)
        .map(|i| round_half_even(t as f64 - i as f64 * ratio))
        .collect()
}

/// `np.linspace(start, end, n)` in float64: `start + i * step`, the last value exactly `end`.
fn linspace_np(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = end;
    v
}

/// `np.interp(x, arange(len(table)), table)` in float64.
fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let i = x.floor() as usize;
    let (a, b) = (table[i] as f64, table[i + 1] as f64);
    let w = x - i as f64;
    // numpy's interp: slope * (x - xp[i]) + fp[i].
    (b - a) * w + a
}

/// `np.log` of the float32 sigma table, as float32.
fn log_table(table: &[f32]) -> Vec<f32> {
    table.iter().map(|s| s.ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma is `sigma`'s,
/// by linear interpolation in log-sigma.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // The last index whose log-sigma is at most log_sigma, clipped to n - 2.
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low = count.saturating_sub(1).min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) sigmas, rho 7, from `hi` down to `lo` (the config's sigma_min and
/// sigma_max when it sets them).
fn karras(cfg: &SchedulerConfig, lo: f64, hi: f64, steps: usize) -> Vec<f64> {
    let lo = cfg.sigma_min.unwrap_or(lo);
    let hi = cfg.sigma_max.unwrap_or(hi);
    let rho = 7.0;
    let (min_inv, max_inv) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
    linspace_np(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
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
