//! Human-preference reward models, differentiable with respect to the image: HPSv2 (OpenCLIP),
//! PickScore and CLIP score (transformers CLIPModel), LAION aesthetic v2 (CLIP ViT-L/14 image
//! embedding + MLP head). Each scores a batch of images in [0, 1] of any size against prompts.

pub mod aesthetic;
pub mod hf_clip;
pub mod load;
pub mod open_clip;
pub mod preprocess;

use crate::error::{Error, Result};
use candle_core::Tensor;

/// A reward: one score per image, differentiable with respect to `images`.
pub trait Reward {
    /// The reward's name as the CLI spells it.
    fn name(&self) -> &'static str;

    /// Scores `images` (`[n, 3, h, w]`, values in [0, 1], any size) against `prompts`
    /// (one per image; ignored by prompt-free rewards). Returns `[n]`.
    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor>;

    /// True for judges that only evaluate: per-sample adaptation and training never
    /// optimise against them, so they can tell real improvement from reward hacking.
    fn evaluation_only(&self) -> bool {
        false
    }

    /// The reward's CLIP image encoder, for rewards built on one; None for the others. Asking
    /// costs nothing (no forward pass), so callers can choose a reward by it. Videos' temporal
    /// consistency is measured with it ([`temporal_consistency`]).
    fn image_encoder(&self) -> Option<&dyn ImageEncoder> {
        None
    }
}

/// A CLIP image encoder inside a reward.
pub trait ImageEncoder {
    /// L2-normalised image embeddings of `images` (`[n, 3, h, w]` in [0, 1], any size), `[n, d]`.
    fn image_features(&self, images: &Tensor) -> Result<Tensor>;
}

/// A clip's temporal consistency: the mean cosine between consecutive frames' image
/// embeddings `[frames, d]` (L2-normalised). 1 for a still clip (or a single frame).
pub fn temporal_consistency(features: &Tensor) -> Result<f64> {
    let f = features.dim(0)?;
    if f < 2 {
        return Ok(1.0);
    }
    let a = features.narrow(0, 0, f - 1)?;
    let b = features.narrow(0, 1, f - 1)?;
    Ok(rowwise_dot(&a, &b)?
        .to_dtype(candle_core::DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}

/// Checks the image batch against the prompt list.
pub fn check_batch(images: &Tensor, prompts: &[String], needs_prompts: bool) -> Result<usize> {
    let dims = images.dims();
    if dims.len() != 4 || dims[1] != 3 {
        return Err(Error::Invalid(format!(
            "reward models take images of shape [n, 3, h, w]; got {dims:?}"
        )));
    }
    let n = dims[0];
    if needs_prompts && prompts.len() != n {
        return Err(Error::Invalid(format!(
            "{} prompt(s) for {n} image(s): give one prompt per image",
            prompts.len()
        )));
    }
    Ok(n)
}

/// Row-wise L2 normalisation, `[n, d]`, in f32 for half-precision features (the reward's
/// final reduction, as autocast runs norms).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let x = &x.to_dtype(crate::precision::activation_dtype(x.dtype()))?;
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Row-wise dot product of two `[n, d]` tensors: `[n]`.
pub fn rowwise_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a * b)?.sum(1)?)
}

/// A linear stand-in reward, sum(w * pixels) per image: the parity fixtures' reward, and a
/// cheap reward for benchmarks of the gradient path.
pub struct LinearReward(pub Tensor);

impl Reward for LinearReward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        Ok(images.broadcast_mul(&self.0)?.flatten_from(1)?.sum(1)?)
    }
}
