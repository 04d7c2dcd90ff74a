//! Layer norm and group norm written from basic ops (candle's fused layer norm has no backward
//! and yields a wrong gradient without an error). Statistics in f32 for half-precision inputs.

use super::attach;
use super::dispatch::{self, Grad};
use crate::error::Result;
use crate::weights::Vb;
use candle_core::{Tensor, D};

/// Normalises `xs` over its last dimension to zero mean, unit variance (biased, as PyTorch).
/// On the gradient path (any device) the backward is the closed form
/// dx = (g - mean(g) - x^ mean(g x^)) / sigma, a few passes instead of the composition's many,
/// keeping only the output and 1 / sigma rather than every intermediate.
fn normalize_last(xs: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if dispatch::tracked(xs) {
        let x = xs.detach();
        let n = x.dim(D::Minus1)? as f64;
        let centered = x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / n)?)?;
        let rstd = ((centered.sqr()?.sum_keepdim(D::Minus1)? / n)? + eps)?
            .sqrt()?
            .recip()?;
        let value = centered.broadcast_mul(&rstd)?;
        drop(centered);
        return attach::attach(xs, value, move |g, xhat| {
            let mean_g = (g.sum_keepdim(D::Minus1)? / n)?;
            let mean_gx = ((g * xhat)?.sum_keepdim(D::Minus1)? / n)?;
            g.broadcast_sub(&mean_g)?
                .sub(&xhat.broadcast_mul(&mean_gx)?)?
                .broadcast_mul(&rstd)
        });
    }
    if dispatch::plan(&[xs], &[]).fused {
        let d = xs.dim(D::Minus1)?;
        let (ones, zeros) = (
            Tensor::ones(d, xs.dtype(), xs.device())?,
            Tensor::zeros(d, xs.dtype(), xs.device())?,
        );
        return super::cpu_layer_norm::layer_norm(xs, &ones, &zeros, eps);
    }
    let n = xs.dim(D::Minus1)? as f64;
    let mean = (xs.sum_keepdim(D::Minus1)? / n)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `x * w + b` with frozen `w`, `b` (broadcast): on the gradient path the backward is
/// `g * w` alone, without the weight and bias gradients candle would compute.
fn affine(x: &Tensor, w: &Tensor, b: &Tensor, w_for_grad: &Tensor) -> candle_core::Result<Tensor> {
    // Trainable weights (a `Var`) take the plain ops, so their gradients are computed too.
    if dispatch::plan(&[x], &[w, b]).grad == Grad::InputOnly {
        let value = x.detach().broadcast_mul(w)?.broadcast_add(b)?;
        let w = w_for_grad.clone();
        return attach::attach(x, value, move |g, _| g.broadcast_mul(&w));
    }
    x.broadcast_mul(w)?.broadcast_add(b)
}

/// `torch.nn.LayerNorm(dim)` with affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: &Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.get(&[dim], "weight")?,
            bias: vb.get(&[dim], "bias")?,
            eps,
        })
    }

    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// # Shapes
    /// `[..., dim]` -> `[..., dim]`
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // Half-precision inputs (autocast): statistics, normalisation and affine in f32,
        // rounded once to the input's dtype, as PyTorch's autocast runs layer_norm in f32.
        let x = super::at_least_f32(xs)?;
        let (w, b) = (
            self.weight.to_dtype(x.dtype())?,
            self.bias.to_dtype(x.dtype())?,
        );
        let plan = dispatch::plan(&[&x], &[&w, &b]);
        if plan.fused && plan.grad == Grad::None {
            return super::cpu_layer_norm::layer_norm(&x, &w, &b, self.eps)?.to_dtype(xs.dtype());
        }
        let normed = normalize_last(&x, self.eps)?;
        affine(&normed, &w, &b, &w)?.to_dtype(xs.dtype())
    }
}

/// `torch.nn.LayerNorm(dim, elementwise_affine=False)`: the normalisation alone (statistics in
/// f32 for half-precision inputs, rounded once to the input's dtype).
pub fn layer_norm_plain(xs: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x = super::at_least_f32(xs)?;
    normalize_last(&x, eps)?.to_dtype(xs.dtype())
}

/// PixArt's (adaLN's) modulated norm `layer_norm_plain(x) (1 + scale) + shift`, `x`
/// `[b, n, d]`, `shift` and `scale` `[b, 1, d]`: one pass per row without a graph on the CPU.
pub fn layer_norm_modulated(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let plan = dispatch::plan(&[x, shift, scale], &[]);
    if plan.fused && plan.grad == Grad::None {
        let (b, _, d) = x.dims3()?;
        let w = (scale + 1.0)?.reshape((b, d))?;
        return super::cpu_layer_norm::layer_norm(x, &w, &shift.reshape((b, d))?, eps);
    }
    layer_norm_plain(x, eps)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)
}

/// `torch.nn.GroupNorm(groups, channels)` with affine weight and bias.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: &Vb) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::error::Error::Invalid(format!(
                "{}: group norm with {channels} channels cannot use {groups} groups; fix norm_num_groups in config.json",
                vb.file().display()
            )));
        }
        Ok(Self {
            weight: vb.get(&[channels], "weight")?,
            bias: vb.get(&[channels], "bias")?,
            groups,
            eps,
        })
    }

    /// # Shapes
    /// `[b, c, ...]` -> same
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(xs, false)
    }

    /// `silu(self.forward(xs))`, fused where the CPU kernel applies.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(xs, true)
    }

    fn forward_act(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let c = self.weight.dim(0)?;
        if xs.rank() < 2 || xs.dim(1)? != c {
            candle_core::bail!(
                "group norm of {c} channels got an input of shape {:?}",
                xs.dims()
            );
        }
        let plan = dispatch::plan(&[xs], &[&self.weight, &self.bias]);
        if plan.fused && plan.grad != Grad::All && xs.rank() >= 2 {
            let (w, b) = (&self.weight, &self.bias);
            return super::cpu_norm::group_norm(xs, self.groups, self.eps, w, b, silu);
        }
        // Half-precision inputs (autocast): norm, affine and SiLU in f32, rounded once.
        let y = self.composed_f32(xs)?;
        let y = if silu { y.silu()? } else { y };
        y.to_dtype(xs.dtype())
    }

    /// Group norm from basic ops (half precision, other devices, trainable weights).
    pub fn composed(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.composed_f32(xs)?.to_dtype(xs.dtype())
    }

    /// [`Self::composed`] before rounding back: in f32 for half-precision inputs.
    fn composed_f32(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x = super::at_least_f32(xs)?;
        let grouped = x.reshape((b, self.groups, ()))?;
        let normed = normalize_last(&grouped, self.eps)?.reshape(dims.as_slice())?;
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = c;
        let w = self
            .weight
            .to_dtype(x.dtype())?
            .reshape(wshape.as_slice())?;
        let bias = self.bias.to_dtype(x.dtype())?;
        affine(&normed, &w, &bias.reshape(wshape.as_slice())?, &w)
    }
}
