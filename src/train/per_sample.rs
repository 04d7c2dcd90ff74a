//! Per-sample adaptation (ReNeg Sec. 3.3): starting from the global embedding, up to `steps`
//! reward steps on one prompt (and its seed), stopping after `patience` steps without
//! improvement, keeping the best embedding seen. The start is a candidate too, so the result
//! is never worse than the start on that prompt's reward.

use super::optim::{for_learned, global_norm, update_learned, AdamWConfig};
use super::step::{reneg_gradient, sampled_reward, Objective, Sampling};
use crate::conditioning::Conditioning;
use crate::error::Result;
use crate::Pipeline;
use candle_core::{DType, Device};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdaptConfig {
    pub steps: usize,
    pub patience: usize,
    pub lr: f64,
    /// The gradient step is drawn from the last this many sampling steps.
    pub grad_step_window: usize,
}

impl AdaptConfig {
    /// Adaptation for a sampler of `sampling_steps` steps: the gradient step drawn from its
    /// last 10 (from all of them when there are fewer).
    pub fn for_sampler(steps: usize, patience: usize, lr: f64, sampling_steps: usize) -> Self {
        Self {
            steps,
            patience,
            lr,
            grad_step_window: sampling_steps.min(10),
        }
    }
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            steps: 10,
            patience: 3,
            lr: 5e-3,
            grad_step_window: 10,
        }
    }
}

pub struct Adapted {
    /// The best negative seen (every learned part adapted; f32 on the CPU).
    pub embedding: Conditioning,
    pub start_reward: f64,
    pub best_reward: f64,
    /// Reward after each step taken (sampled images).
    pub history: Vec<f64>,
}

/// Adapts `start` (a negative of batch 1) to `prompt` with the image seed `seed`.
pub fn adapt(
    sd: &mut Pipeline,
    objective: &Objective,
    start: &Conditioning,
    prompt: &str,
    seed: u64,
    cfg: &AdaptConfig,
    s: &Sampling,
) -> Result<Adapted> {
    let prompts = [prompt.to_string()];
    let dtype = sd.dtype();
    let device = sd.device().clone();
    let to_model = |c: &Conditioning| c.map(|_, t| Ok(t.to_dtype(dtype)?.to_device(&device)?));
    let start32 = start.map(|_, t| Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))?;
    let start_reward =
        sampled_reward(sd, objective, &to_model(&start32)?, &prompts, &[seed], s)?[0];
    let (mut best, mut best_reward) = (start32.clone(), start_reward);
    let mut emb = start32.clone();
    let mut opt = for_learned(
        &AdamWConfig {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
        &emb,
    )?;
    let mut since_best = 0;
    let mut history = vec![];
    let window = cfg.grad_step_window.clamp(1, s.steps);
    for i in 0..cfg.steps {
        let k = s.steps - window + i % window;
        let r = reneg_gradient(sd, objective, &to_model(&emb)?, &prompts, &[seed], k, s)?;
        let g = r
            .grad
            .iter()
            .map(|g| Ok(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        if !global_norm(&g)?.is_finite() {
            break;
        }
        emb = update_learned(&mut opt, &emb, &g, cfg.lr)?;
        let reward = sampled_reward(sd, objective, &to_model(&emb)?, &prompts, &[seed], s)?[0];
        history.push(reward);
        if reward.is_finite() && reward > best_reward {
            best = emb.clone();
            best_reward = reward;
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    Ok(Adapted {
        embedding: best,
        start_reward,
        best_reward,
        history,
    })
}
