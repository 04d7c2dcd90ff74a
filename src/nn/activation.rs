//! Activation functions by the names the owners' configs use.

use super::attach;
use super::dispatch::{self, Grad};
use candle_core::{Result, Tensor, D};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// transformers' "gelu": the exact, erf-based GELU.
    Gelu,
    /// OpenAI CLIP's x * sigmoid(1.702 x).
    QuickGelu,
    /// "gelu_new" / "gelu_pytorch_tanh": the tanh approximation.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    #[serde(alias = "swish")]
    Silu,
    Relu,
}

impl Activation {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => gelu_erf(xs),
            Activation::QuickGelu => xs * sigmoid(&(xs * 1.702)?)?,
            Activation::GeluNew => gelu_tanh(xs),
            Activation::Silu => xs.silu(),
            Activation::Relu => xs.relu(),
        }
    }
}

/// Exact GELU, x/2 (1 + erf(x / sqrt 2)): our fused kernel on the CPU
/// ([`cpu_gelu::gelu`](super::cpu_gelu::gelu)), elsewhere candle ops with a closed-form
/// backward g (Φ(x) + x φ(x)) that keeps only x (candle's fused `gelu_erf` backward uses
/// 6-digit constants, about 1e-6 relative error; the composition keeps four intermediates).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    let plan = dispatch::plan(&[xs], &[]);
    if plan.fused && xs.rank() > 0 {
        return super::cpu_gelu::gelu(xs);
    }
    if plan.grad == Grad::None {
        return gelu_composed(xs);
    }
    let x = xs.detach();
    attach::attach(xs, gelu_composed(&x)?, move |g, _| g * gelu_derivative(&x)?)
}

/// diffusers' GEGLU product `a gelu(b)` for `h = [a | b]` split in halves over the last
/// dimension (the first half is the value, the second its gate): fused on the CPU
/// ([`cpu_gelu::geglu`](super::cpu_gelu::geglu)), elsewhere candle ops with a closed-form
/// backward `[g gelu(b) | g a gelu'(b)]` that keeps only `h`.
///
/// # Shapes
/// `[..., 2 n]` -> `[..., n]`
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h.dims().last().copied().unwrap_or(0);
    if last % 2 != 0 {
        candle_core::bail!("geglu: the last dimension ({last}) must be even");
    }
    let plan = dispatch::plan(&[h], &[]);
    if plan.fused {
        return super::cpu_gelu::geglu(h);
    }
    let halves = move |h: &Tensor| -> Result<(Tensor, Tensor)> {
        let n = last / 2;
        Ok((h.narrow(D::Minus1, 0, n)?, h.narrow(D::Minus1, n, n)?))
    };
    if plan.grad == Grad::None {
        let (a, b) = halves(h)?;
        return a * gelu_composed(&b)?;
    }
    let hd = h.detach();
    let (a, b) = halves(&hd)?;
    let value = (&a * gelu_composed(&b)?)?;
    attach::attach(h, value, move |g, _| {
        let (a, b) = halves(&hd)?;
        let da = (g * gelu_composed(&b)?)?;
        let db = ((g * a)? * gelu_derivative(&b)?)?;
        Tensor::cat(&[da, db], D::Minus1)
    })
}

/// x Φ(x) from candle ops; half-precision inputs are computed in f32 and rounded once, as
/// PyTorch's one GELU kernel does (five roundings in f16 doubled the error).
fn gelu_composed(xs: &Tensor) -> Result<Tensor> {
    let x = crate::nn::at_least_f32(xs)?;
    let cdf = ((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
    ((&x * 0.5)? * cdf)?.to_dtype(xs.dtype())
}

/// gelu'(x) = Φ(x) + x φ(x) from candle ops (in f32 for half-precision inputs, as
/// [`gelu_composed`]).
fn gelu_derivative(xs: &Tensor) -> Result<Tensor> {
    let x = &crate::nn::at_least_f32(xs)?;
    let cdf = (((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * inv_sqrt_2pi)?;
    (cdf + (x * pdf)?)?.to_dtype(xs.dtype())
}

/// GELU's tanh approximation, composed for an exact backward (as [`gelu_erf`]).
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    // The fused kernel and its fused backward on the CPU (the composition below makes eight
    // passes over the feed-forward's widest activation, and keeps their graph).
    let plan = dispatch::plan(&[xs], &[]);
    if plan.fused && xs.rank() > 0 {
        return super::cpu_gelu::gelu_tanh(xs);
    }
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((xs + (xs.powf(3.0)? * 0.044715)?)? * k)?;
    (xs * 0.5)? * (inner.tanh()? + 1.0)?
}

/// Logistic sigmoid from basic ops (candle_nn's is a custom op; this one's backward is plain).
pub fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    (xs.neg()?.exp()? + 1.0)?.recip()
}
