//! Activation functions by the names the owners' configs use.

use candle_core::{Result, Tensor};
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
/// ([`cpu_gelu::gelu`](super::cpu_gelu::gelu)), elsewhere composed so that its backward is
/// exact (candle's fused `gelu_erf` backward uses 6-digit constants, about 1e-6 relative
/// error).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::cpu_gelu::gelu(xs)? {
        return Ok(y);
    }
    let cdf = ((xs * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
    (xs * 0.5)? * cdf
}

/// GELU's tanh approximation, composed for an exact backward (as [`gelu_erf`]).
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((xs + (xs.powf(3.0)? * 0.044715)?)? * k)?;
    (xs * 0.5)? * (inner.tanh()? + 1.0)?
}

/// Logistic sigmoid from basic ops (candle_nn's is a custom op; this one's backward is plain).
pub fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    (xs.neg()?.exp()? + 1.0)?.recip()
}
