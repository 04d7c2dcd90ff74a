//! Numeric precision as users of PyTorch expect it: `f32`, `tf32`, `bf16`, `fp16`.
//!
//! - `f32`: weights and activations in f32, true f32 matmuls (PyTorch with TF32 off).
//! - `tf32`: f32 with tensor-core matmuls (candle's reduced-precision f32 gemm on CUDA;
//!   PyTorch's `allow_tf32`). The CPU has no TF32: there it is f32.
//! - `bf16`, `fp16`: autocast, not a cast. Weights and the inputs of every matmul and
//!   convolution are in the low type ([`crate::nn::Linear`] and [`crate::nn::Conv2d`] cast their
//!   input to their weight's dtype); norm statistics and softmax run in f32 (`nn::norm`,
//!   `nn::attention`); everything between models stays f32: latents, the scheduler, prompt
//!   embeddings, decoded pixels, the rewards' normalisation and final reduction, the loss. The
//!   negative embedding and AdamW's state are f32 masters on the device, cast to the low type
//!   inside the graph. `fp16` adds dynamic loss scaling ([`LossScaler`]), since its small
//!   exponent range underflows small gradients.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

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
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
    #[value(alias = "f16")]
    Fp16,
}

impl Precision {
    /// The dtype weights are stored and multiplied in.
    pub fn weight_dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }

    /// Whether the backward scales the loss dynamically (fp16 only).
    pub fn loss_scaling(self) -> bool {
        self == Precision::Fp16
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// Refuses what `device` cannot run, naming the flag.
    pub fn check(self, device: &Device) -> Result<()> {
        if self == Precision::Bf16 && device.is_cpu() {
            return Err(Error::Invalid(
                "--precision bf16 is not supported on the CPU (candle has no bf16 matmul there); use f32 or fp16, or --device cuda".into(),
            ));
        }
        Ok(())
    }

    /// Sets the process-wide matmul mode for this precision: TF32 tensor cores for `tf32` on
    /// CUDA (off otherwise, so `f32` is true f32); f32 accumulation for bf16/fp16 gemms, as
    /// PyTorch's autocast does. No effect on the CPU.
    pub fn apply(self, device: &Device) {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            use candle_core::cuda_backend as cb;
            cb::set_gemm_reduced_precision_f32(self == Precision::Tf32);
            cb::set_gemm_reduced_precision_f16(false);
            cb::set_gemm_reduced_precision_bf16(false);
        }
        let _ = device;
    }
}

/// Half-precision dtypes as f32 (the activation dtype between models under autocast); f32 and
/// f64 unchanged.
pub fn activation_dtype(weights: DType) -> DType {
    match weights {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Dynamic loss scaling for fp16 (as `torch.cuda.amp.GradScaler`): the loss is multiplied by
/// `scale` before the backward and the gradient divided by it after; a non-finite gradient
/// skips the step and halves the scale, and every `growth_interval` finite steps in a row
/// double it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Finite steps since the last change of scale.
    pub good_steps: u64,
    pub growth_interval: u64,
}

impl LossScaler {
    /// PyTorch's defaults: 2^16, doubled after 2000 finite steps.
    pub fn new() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
        }
    }

    /// A scale of 1 that never changes (every precision but fp16).
    pub fn off() -> Self {
        Self {
            scale: 1.0,
            good_steps: 0,
            growth_interval: 0,
        }
    }

    pub fn for_precision(p: Precision) -> Self {
        if p.loss_scaling() {
            Self::new()
        } else {
            Self::off()
        }
    }

    fn active(&self) -> bool {
        self.growth_interval > 0
    }

    /// Records a step's outcome; returns whether its update should be applied. A non-finite
    /// gradient under scaling is an overflow, not a bad step: the scale halves (down to 1).
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.active() {
            return finite;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
        }
        finite
    }

    /// Whether a non-finite step was an overflow of the scaled backward (to be retried at a
    /// lower scale) rather than a bad step of the objective itself.
    pub fn absorbs_overflow(&self) -> bool {
        self.active() && self.scale > 1.0
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::off()
    }
}
