//! One ReNeg gradient evaluation (Li et al. 2024, Sec. 3): sample with guidance and without a
//! graph down to timestep index `k`, take the one guided step whose negative branch carries
//! the gradient, predict x0, decode, map to [0, 1], score; loss = -(weighted) mean reward.

use crate::conditioning::Conditioning;
use crate::error::{Error, Result};
use crate::reward::Reward;
use crate::Pipeline;
use candle_core::{Tensor, Var};

/// How decoded pixels reach the rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixels {
    /// Mapped from [-1, 1] to [0, 1] and clamped (reward models' input; ReNeg and DRaFT).
    Unit,
    /// The decoder's raw output (the parity fixtures' linear stand-in reward).
    Raw,
}

/// The rewards of the objective with their weights.
pub struct Objective {
    pub rewards: Vec<(Box<dyn Reward>, f64)>,
    pub pixels: Pixels,
}

impl Objective {
    pub fn new(rewards: Vec<(Box<dyn Reward>, f64)>) -> Self {
        Self {
            rewards,
            pixels: Pixels::Unit,
        }
    }

    fn images(&self, decoded: &Tensor) -> Result<Tensor> {
        match self.pixels {
            Pixels::Unit => to_unit(decoded),
            Pixels::Raw => Ok(decoded.clone()),
        }
    }

    /// An error unless some reward can be optimised (evaluation-only judges cannot).
    pub fn check_optimisable(&self) -> Result<()> {
        if self.rewards.iter().any(|(r, _)| !r.evaluation_only()) {
            Ok(())
        } else {
            Err(Error::Invalid(
                "nothing to optimise: every reward given is evaluation-only (a judge); give one that can be optimised".into(),
            ))
        }
    }

    /// The objective of decoded pixels (raw decoder output): `[n, 3, H, W]` images, or
    /// `[n, 3, frames, H, W]` videos scored as the mean over their frames. Returns `[n]`.
    pub fn score_decoded(&self, decoded: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let images = self.images(decoded)?;
        if images.rank() != 5 {
            return self.score(&images, prompts);
        }
        let (n, c, f, h, w) = images.dims5()?;
        let frames = images
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((n * f, c, h, w))?;
        let per_frame: Vec<String> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), f))
            .collect();
        Ok(self.score(&frames, &per_frame)?.reshape((n, f))?.mean(1)?)
    }

    /// Weighted sum of the rewards, per image: `[n]`. Evaluation-only rewards (judges) are
    /// left out: nothing is ever optimised against them.
    pub fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        self.check_optimisable()?;
        let mut total: Option<Tensor> = None;
        for (r, w) in self.rewards.iter().filter(|(r, _)| !r.evaluation_only()) {
            let s = (r.score(images, prompts)? * *w)?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        total.ok_or_else(|| Error::Invalid("the objective has no reward".into()))
    }
}

/// What one micro-batch gives.
pub struct StepResult {
    pub loss: f64,
    /// d loss / d each learned part of the negative ([`Conditioning::learned`]'s order):
    /// `[1, L, D]` for the embeddings first.
    pub grad: Vec<Tensor>,
    pub rewards: Vec<f64>,
}

/// How the gradient step's backward is arranged; both give the same gradient.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Backward {
    /// d loss / d x0 through decoder and reward first, then the negative UNet branch is
    /// recomputed with a graph: the decoder's and the UNet's graphs never coexist (one more
    /// UNet forward; the lower peak memory).
    #[default]
    Staged,
    /// One graph through the negative UNet branch, decoder and reward: no recomputation
    /// (about 17-25% faster on the CPU), with the UNet's graph alive during the decoder's
    /// backward (peak memory 5-27% higher; BENCHMARKS.md).
    OnePass,
}

/// Settings shared by training and per-sample adaptation.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub steps: usize,
    pub guidance_scale: f64,
    pub height: usize,
    pub width: usize,
    /// Frames per video for a text-to-video model; None for an image model.
    pub frames: Option<usize>,
    pub backward: Backward,
    /// The loss is multiplied by this before the backward and the gradient divided by it
    /// after (fp16's dynamic loss scaling, `crate::precision::LossScaler`); 1 otherwise.
    pub loss_scale: f64,
}

/// Starting noise for `seeds`, `[n, C, h, w]` (`[n, C, frames, h, w]` for videos).
pub fn noise(sd: &Pipeline, seeds: &[u64], s: &Sampling) -> Result<Tensor> {
    let shape = [vec![1], sd.latent_shape(s.height, s.width, s.frames)?].concat();
    let parts = seeds
        .iter()
        .map(|&seed| crate::rng::randn(seed, &shape, sd.dtype(), sd.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Decoded pixels mapped from [-1, 1] to [0, 1] (clamped, as ReNeg and DRaFT do).
pub fn to_unit(images: &Tensor) -> Result<Tensor> {
    Ok(((images * 0.5)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// The conditioning of `prompts`, batch `n` (the encoder makes lengths equal:
/// [`Pipeline::batch`]).
pub fn encode_all(sd: &Pipeline, prompts: &[String]) -> Result<Conditioning> {
    let e = prompts
        .iter()
        .map(|p| sd.encode(p))
        .collect::<Result<Vec<_>>>()?;
    sd.batch(&e.iter().collect::<Vec<_>>())
}

/// The negative with a fresh variable for each learned part (the mask stays as it is), and
/// the variables, in [`Conditioning::learned`]'s order.
fn variables(negative: &Conditioning) -> Result<(Conditioning, Vec<Var>)> {
    let vars = negative
        .learned()
        .iter()
        .map(|(_, t)| Var::from_tensor(&t.detach()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    Ok((negative.detach().with_learned(&tensors)?, vars))
}

/// Each variable's gradient in `grads` (zeros for one the loss does not reach).
fn gradients(grads: &candle_core::backprop::GradStore, vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// The gradient of the ReNeg loss for one micro-batch, taken at sampling step index `k`.
pub fn reneg_gradient(
    sd: &mut Pipeline,
    objective: &Objective,
    embedding: &Conditioning,
    prompts: &[String],
    seeds: &[u64],
    k: usize,
    s: &Sampling,
) -> Result<StepResult> {
    let start = noise(sd, seeds, s)?;
    reneg_gradient_from(sd, objective, embedding, prompts, start, seeds, k, s)
}

/// [`reneg_gradient`] from given standard-normal starting noise `[n, C, h, w]` (scaled to
/// the sampler's initial sigma here); `seeds` give a stochastic sampler's step noise.
#[allow(clippy::too_many_arguments)]
pub fn reneg_gradient_from(
    sd: &mut Pipeline,
    objective: &Objective,
    embedding: &Conditioning,
    prompts: &[String],
    start: Tensor,
    seeds: &[u64],
    k: usize,
    s: &Sampling,
) -> Result<StepResult> {
    let n = prompts.len();
    let cond = encode_all(sd, prompts)?;
    sd.scheduler.set_timesteps(s.steps)?;
    if k >= sd.scheduler.len() {
        return Err(Error::Invalid(format!(
            "gradient step {k} is past the last sampling step"
        )));
    }
    let frozen = embedding.detach().repeat(n)?;
    let mut x = sd.start_latents(start)?;
    for i in 0..k {
        x = sd.sample_step(&x, i, &cond, &frozen, s.guidance_scale, seeds)?;
    }
    gradient_at(
        sd,
        objective,
        embedding,
        prompts,
        &cond,
        &x,
        k,
        (s.guidance_scale, s.backward, s.loss_scale),
    )
}

/// The reward of fully sampled images (no gradient): what validation and per-sample
/// adaptation compare.
pub fn sampled_reward(
    sd: &mut Pipeline,
    objective: &Objective,
    embedding: &Conditioning,
    prompts: &[String],
    seeds: &[u64],
    s: &Sampling,
) -> Result<Vec<f64>> {
    let n = prompts.len();
    let cond = encode_all(sd, prompts)?;
    let uncond = embedding.detach().repeat(n)?.contiguous()?;
    let latents = sd.sample(
        noise(sd, seeds, s)?,
        s.steps,
        &cond,
        &uncond,
        s.guidance_scale,
        seeds,
        |_, _| {},
    )?;
    Ok(objective
        .score_decoded(&sd.decode(&latents)?, prompts)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?)
}

/// The gradient step at sampler step `i` from latents `x` (`[n, C, h, w]` in the sampler's
/// scale, no graph; the scheduler's timesteps set): the guided
/// noise prediction (guidance scale `g`), x0, decode, rewards, and d loss / d embedding
/// through the negative branch only, arranged as `backward` says, with the loss scaled by
/// `scale` in the backward (the returned gradient is unscaled).
#[allow(clippy::too_many_arguments)]
pub fn gradient_at(
    sd: &Pipeline,
    objective: &Objective,
    embedding: &Conditioning,
    prompts: &[String],
    cond: &Conditioning,
    x: &Tensor,
    i: usize,
    (g, backward, scale): (f64, Backward, f64),
) -> Result<StepResult> {
    let n = prompts.len();
    let t = sd.scheduler.timestep(i)?;
    // The UNet sees the sampler's scaled input; x0 is predicted on `x` itself.
    let input = sd.scheduler.scale_model_input(x, i)?;
    let unscale =
        |grad: Tensor| -> Result<Tensor> { Ok(if scale == 1.0 { grad } else { (grad / scale)? }) };
    if backward == Backward::OnePass {
        let (negative, vars) = variables(embedding)?;
        let (u, c) = sd.branches(&input, t, cond, &negative.repeat(n)?)?;
        let x0 = sd.guided_x0(&u, &c, i, x, g)?;
        let scores = objective.score_decoded(&sd.decode(&x0)?, prompts)?;
        let loss = scores.mean_all()?.neg()?;
        let grad = gradients(&(&loss * scale)?.backward()?, &vars)?;
        return Ok(StepResult {
            loss: loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
            grad: grad.into_iter().map(unscale).collect::<Result<_>>()?,
            rewards: scores.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?,
        });
    }
    let frozen = embedding.detach().repeat(n)?;
    // The backward is staged so the decoder's and the UNet's graphs never coexist:
    // (1) x0 without a graph, then d loss / d x0 through decode and reward;
    // (2) the negative branch again, with a graph, and back from x0 with that gradient.
    // The prompt branch c is computed once, without a graph (beside u0: `Pipeline::branches`).
    let (u0, c) = sd.branches(&input, t, cond, &frozen)?;
    let x0 = Var::from_tensor(&sd.guided_x0(&u0, &c, i, x, g)?)?;
    drop(u0);
    let scores = objective.score_decoded(&sd.decode(x0.as_tensor())?, prompts)?;
    let loss = scores.mean_all()?.neg()?;
    let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let rewards = scores.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
    // Scaled here; the surrogate's backward then carries the scale to the embedding.
    let d_x0 = (&loss * scale)?
        .backward()?
        .get(x0.as_tensor())
        .cloned()
        .unwrap_or_else(|| x0.as_tensor().zeros_like().expect("zeros"))
        .detach();
    drop((scores, loss));

    let (negative, vars) = variables(embedding)?;
    let (negative, _) = sd.same_length(&negative.repeat(n)?, cond)?;
    let u = sd.branch_eps(&input, t, &negative, true)?;
    let surrogate = (sd.guided_x0(&u, &c, i, x, g)? * d_x0)?.sum_all()?;
    let grad = gradients(&surrogate.backward()?, &vars)?;
    Ok(StepResult {
        loss: loss_value,
        grad: grad.into_iter().map(unscale).collect::<Result<_>>()?,
        rewards,
    })
}
