//! Diffusion samplers, mirroring diffusers 0.42.1 step for step: DDIM (with `eta`), Euler,
//! Euler ancestral, DPM++ 2M (and its Karras-sigma variant), UniPC and PNDM.
//!
//! A model's `scheduler_config.json` is read as diffusers' `from_config` reads it: each sampler
//! takes the keys it uses and its own class's defaults for the others (DPM++ and Euler space
//! timesteps by `linspace` unless the file says otherwise; DDIM and PNDM by `leading`). The
//! sampler a model runs by default is the class its file names, as in diffusers; `--scheduler`
//! picks another.
//!
//! Every sampler exposes the same four operations: its timesteps, the input scaling the UNet
//! sees, one step, and the differentiable prediction of the clean latents at a step, which is
//! what ReNeg's reward gradient decodes.

mod config;
mod ddim;
mod dpm;
mod euler;
mod pndm;
pub mod schedule;
mod unipc;

pub use config::{ProcessTables, SchedulerConfig, SchedulerKind};
pub use schedule::{BetaSchedule, PredictionType, TimestepSpacing};

use crate::error::{Error, Result};
use candle_core::Tensor;

/// One sampler step's results.
pub struct StepOutput {
    /// The sample at the next (less noisy) step.
    pub prev_sample: Tensor,
    /// The clean latents the step predicted, in the latents' own scale.
    pub pred_original_sample: Tensor,
}

/// The fresh noise a stochastic step adds (Euler ancestral, DDIM with eta > 0): called with the
/// step index and the sample's shape. reneg draws it per image from the image's seed and the
/// step ([`crate::rng::step_noise`]), so an image does not depend on its batch.
pub type NoiseFn<'a> = dyn FnMut(usize, &[usize]) -> Result<Tensor> + 'a;

/// A sampler with its noise schedule and, for the multistep ones, the state carried between
/// steps. `set_timesteps` starts a new run; steps must then be taken in order.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    cfg: SchedulerConfig,
    sched: schedule::Schedule,
    state: State,
    /// The next step `step` expects.
    next: usize,
}

/// What a sampler carries from one step to the next.
#[derive(Debug, Clone)]
enum State {
    Ddim { eta: f64 },
    Euler,
    EulerAncestral,
    Dpm(dpm::DpmState),
    UniPc(unipc::UniPcState),
    Pndm(pndm::PndmState),
}

impl Scheduler {
    /// The sampler `kind` on the diffusion process `cfg` describes. Refuses settings of the
    /// file the sampler cannot honour (a key and value named, with what to do).
    pub fn new(kind: SchedulerKind, cfg: SchedulerConfig) -> Result<Self> {
        let cfg = cfg.for_kind(kind)?;
        let sched = schedule::Schedule::new(&cfg);
        let state = match kind {
            SchedulerKind::Ddim => State::Ddim { eta: 0.0 },
            SchedulerKind::Euler => State::Euler,
            SchedulerKind::EulerAncestral => State::EulerAncestral,
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                State::Dpm(dpm::DpmState::default())
            }
            SchedulerKind::UniPc => State::UniPc(unipc::UniPcState::default()),
            SchedulerKind::Pndm => State::Pndm(pndm::PndmState::default()),
        };
        Ok(Self {
            kind,
            cfg,
            sched,
            state,
            next: 0,
        })
    }

    /// The sampler the file's `_class_name` names (DDIM when it names none), as diffusers'
    /// pipelines load it. The second value says when the class is one reneg does not
    /// implement and DDIM stands in for it.
    pub fn from_config(cfg: SchedulerConfig) -> Result<(Self, Option<String>)> {
        let (kind, note) = cfg.default_kind();
        Ok((Self::new(kind, cfg)?, note))
    }

    /// DDIM from `cfg` (the sampler ReNeg trains with, as the paper does).
    pub fn ddim(cfg: SchedulerConfig) -> Result<Self> {
        Self::new(SchedulerKind::Ddim, cfg)
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The same diffusion process sampled by `kind`.
    pub fn with_kind(&self, kind: SchedulerKind) -> Result<Self> {
        Self::new(kind, self.cfg.clone())
    }

    /// DDIM's eta (0: deterministic, 1: DDPM's variance). Refused for other samplers.
    pub fn set_eta(&mut self, value: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&value) {
            return Err(Error::Invalid(format!(
                "eta {value}: must be between 0 and 1"
            )));
        }
        match &mut self.state {
            State::Ddim { eta } => {
                *eta = value;
                Ok(())
            }
            _ if value == 0.0 => Ok(()),
            _ => Err(Error::Invalid(format!(
                "eta {value}: only DDIM takes an eta, not {}",
                self.kind.name()
            ))),
        }
    }

    pub fn eta(&self) -> f64 {
        match self.state {
            State::Ddim { eta } => eta,
            _ => 0.0,
        }
    }

    /// Whether a step draws fresh noise.
    pub fn is_stochastic(&self) -> bool {
        match self.state {
            State::Ddim { eta } => eta > 0.0,
            State::EulerAncestral => true,
            _ => false,
        }
    }

    /// A short label for image metadata (A1111's "Sampler:" names where one exists).
    pub fn label(&self) -> String {
        // lvdm's DDIM (VideoCrafter2) samples with its checkpoint's tables.
        let lvdm = if self.cfg.tables.is_some() {
            "lvdm, "
        } else {
            ""
        };
        match self.state {
            State::Ddim { eta } if eta > 0.0 => format!("DDIM ({lvdm}eta {eta})"),
            State::Ddim { .. } if !lvdm.is_empty() => "DDIM (lvdm)".to_string(),
            _ => self.kind.label().to_string(),
        }
    }

    /// Chooses the timesteps of a `steps`-step run (diffusers' `set_timesteps`) and clears the
    /// state of any earlier run.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.sched.set_timesteps(&self.cfg, self.kind, steps)?;
        self.reset();
        Ok(())
    }

    /// Clears the multistep state: the next step is step 0 of the current timesteps.
    pub fn reset(&mut self) {
        self.next = 0;
        match &mut self.state {
            State::Dpm(s) => *s = dpm::DpmState::default(),
            State::UniPc(s) => *s = unipc::UniPcState::default(),
            State::Pndm(s) => *s = pndm::PndmState::default(),
            _ => {}
        }
    }

    /// The timesteps of the current run, largest first: the UNet's time input at each step
    /// (fractional for some spacings and for Karras sigmas). PNDM runs one more than asked.
    pub fn timesteps(&self) -> &[f64] {
        &self.sched.timesteps
    }

    /// The number of UNet evaluations (steps) of the current run.
    pub fn len(&self) -> usize {
        self.sched.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sched.timesteps.is_empty()
    }

    /// The timestep of step `i`.
    pub fn timestep(&self, i: usize) -> Result<f64> {
        self.sched.timesteps.get(i).copied().ok_or_else(|| {
            Error::Invalid(format!(
                "step {i} is past the last of {} sampling steps",
                self.sched.timesteps.len()
            ))
        })
    }

    /// Training's cumulative alphas (alpha-bar), as float32.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.sched.alphas_cumprod
    }

    /// The standard deviation the starting noise is scaled to (1 for the samplers that work
    /// in the variance-preserving scale; the largest sigma, or sqrt(sigma^2 + 1), for Euler).
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let max = self.sched.sigmas.iter().cloned().fold(0f32, f32::max) as f64;
                match self.cfg.timestep_spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                    TimestepSpacing::Leading | TimestepSpacing::Uniform => (max * max + 1.0).sqrt(),
                }
            }
            _ => 1.0,
        }
    }

    /// The UNet's input at step `i`: the sample divided by sqrt(sigma^2 + 1) for Euler, the
    /// sample itself for the others. Differentiable.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let sigma = self.sigma(i)? as f64;
                Ok((sample / (sigma * sigma + 1.0).sqrt())?)
            }
            _ => Ok(sample.clone()),
        }
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        self.sched.sigmas.get(i).copied().ok_or_else(|| {
            Error::Invalid(format!("step {i} has no sigma; call set_timesteps first"))
        })
    }

    /// The clean latents predicted from the model output at step `i` on `sample` (in the
    /// sampler's own scale): what ReNeg decodes for its reward. Differentiable in
    /// `model_output` and `sample`; needs no state, so it can be taken at any step.
    pub fn pred_original_sample(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let pt = self.cfg.prediction_type;
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                euler::x0(pt, self.sigma(i)? as f64, model_output, sample)
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::UniPc => {
                dpm::x0(pt, self.sigma(i)?, model_output, sample)
            }
            SchedulerKind::Ddim | SchedulerKind::Pndm => {
                let t = self.timestep(i)? as usize;
                let clip = self.kind == SchedulerKind::Ddim;
                Ok(ddim::predict(&self.cfg, &self.sched, model_output, t, sample, clip)?.0)
            }
        }
    }

    /// Step `i` (they must come in order after `set_timesteps`): from `sample` and the
    /// model's output on `scale_model_input(sample, i)`. `noise` supplies the fresh noise of
    /// a stochastic step.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseFn<'_>,
    ) -> Result<StepOutput> {
        if self.sched.timesteps.is_empty() {
            return Err(Error::Invalid("call set_timesteps before step".into()));
        }
        if i != self.next || i >= self.sched.timesteps.len() {
            return Err(Error::Invalid(format!(
                "sampler step {i} out of order (expected step {} of {})",
                self.next,
                self.sched.timesteps.len()
            )));
        }
        self.next += 1;
        let (cfg, sched) = (&self.cfg, &self.sched);
        match &mut self.state {
            State::Ddim { eta } => ddim::step(cfg, sched, *eta, model_output, i, sample, noise),
            State::Euler => euler::step(cfg, sched, model_output, i, sample),
            State::EulerAncestral => {
                euler::step_ancestral(cfg, sched, model_output, i, sample, noise)
            }
            State::Dpm(s) => s.step(cfg, sched, model_output, i, sample),
            State::UniPc(s) => s.step(cfg, sched, model_output, i, sample),
            State::Pndm(s) => s.step(cfg, sched, model_output, i, sample),
        }
    }
}
