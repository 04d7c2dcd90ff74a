//! AdamW (Loshchilov & Hutter), as `torch.optim.AdamW`, on one tensor and on every learned
//! part of a negative (one state a part, stepping together, as one torch optimiser over
//! several parameters), and the learning-rate schedule: linear warm-up then cosine decay to
//! zero.

use crate::conditioning::Conditioning;
use crate::error::{Error, Result};
use candle_core::Tensor;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimiser's state for one parameter tensor.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Tensor,
    pub v: Tensor,
    /// Updates taken so far (bias correction uses step + 1 for the next).
    pub step: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, like: &Tensor) -> Result<Self> {
        Ok(Self {
            cfg,
            m: like.zeros_like()?,
            v: like.zeros_like()?,
            step: 0,
        })
    }

    /// The state on `device` (a resumed run's, read on the CPU).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            m: self.m.to_device(device)?,
            v: self.v.to_device(device)?,
            step: self.step,
        })
    }

    /// One update of `param` with `grad` at learning rate `lr`; returns the new parameter.
    pub fn update(&mut self, param: &Tensor, grad: &Tensor, lr: f64) -> Result<Tensor> {
        let c = &self.cfg;
        self.step += 1;
        let t = self.step as i32;
        // Decoupled weight decay first, as torch does.
        let p = (param * (1.0 - lr * c.weight_decay))?;
        self.m = ((&self.m * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
        self.v = ((&self.v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let denom = ((self.v.sqrt()? / bc2.sqrt())? + c.eps)?;
        let update = ((&self.m / denom)? * (lr / bc1))?;
        Ok((p - update)?)
    }
}

/// One AdamW state for each learned part of `negative` ([`Conditioning::learned`]'s order).
pub fn for_learned(cfg: &AdamWConfig, negative: &Conditioning) -> Result<Vec<AdamW>> {
    negative
        .learned()
        .into_iter()
        .map(|(_, t)| AdamW::new(cfg.clone(), t))
        .collect()
}

/// One update of every learned part of `negative` with its gradient; the mask is kept.
pub fn update_learned(
    opts: &mut [AdamW],
    negative: &Conditioning,
    grads: &[Tensor],
    lr: f64,
) -> Result<Conditioning> {
    let learned = negative.learned();
    if opts.len() != learned.len() || grads.len() != learned.len() {
        return Err(Error::Invalid(format!(
            "{} optimiser states and {} gradients for {} learned parts",
            opts.len(),
            grads.len(),
            learned.len()
        )));
    }
    let updated = learned
        .iter()
        .zip(opts.iter_mut())
        .zip(grads)
        .map(|(((_, p), opt), g)| opt.update(p, g, lr))
        .collect::<Result<Vec<_>>>()?;
    negative.with_learned(&updated)
}

/// The norm of all gradients together (`torch.nn.utils.clip_grad_norm_`'s total norm).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads {
        sum += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up over `warmup` steps, then
/// cosine decay from `base` to 0 at `total`.
pub fn cosine_lr(base: f64, step: u64, total: u64, warmup: u64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}
