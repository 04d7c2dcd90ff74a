//! Classifier-free guidance, written once for every family: `u + g (c - u)` from the negative's
//! branch `u` and the prompt's `c`, then, when `rescale` r > 0, diffusers' `rescale_noise_cfg`
//! (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4):
//! `r * guided * std(c) / std(guided) + (1 - r) * guided`, each std over all but the batch axis
//! (torch's unbiased N - 1). The gradient flows through both stds, as in PyTorch.

use crate::error::Result;
use candle_core::Tensor;

/// # Shapes
/// `u`, `c`: `[b, ...]` (the same shape) -> `[b, ...]`
pub fn guide(u: &Tensor, c: &Tensor, g: f64, rescale: f64) -> Result<Tensor> {
    let guided = (u + ((c - u)? * g)?)?;
    if rescale == 0.0 {
        return Ok(guided);
    }
    let ratio = (std_per_sample(c)? / std_per_sample(&guided)?)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok(((rescaled * rescale)? + (guided * (1.0 - rescale))?)?)
}

/// The unbiased standard deviation of each sample, `[b, ...]` -> `[b, 1, ..., 1]`.
fn std_per_sample(x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let n = x.elem_count() / b.max(1);
    let flat = x.reshape((b, n))?;
    let centered = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let var = (centered.sqr()?.sum_keepdim(1)? / (n.max(2) - 1) as f64)?;
    let mut shape = vec![b];
    shape.resize(x.rank(), 1);
    Ok(var.sqrt()?.reshape(shape)?)
}
