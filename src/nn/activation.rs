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
            Activation::Gelu => xs.gelu_erf(),
            Activation::QuickGelu => xs * sigmoid(&(xs * 1.702)?)?,
            Activation::GeluNew => xs.gelu(),
            Activation::Silu => xs.silu(),
            Activation::Relu => xs.relu(),
        }
    }
}

/// Logistic sigmoid from basic ops (candle_nn's is a custom op; this one's backward is plain).
pub fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    (xs.neg()?.exp()? + 1.0)?.recip()
}
