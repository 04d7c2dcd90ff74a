//! `torch.nn.Conv2d` with square kernels, symmetric padding, dilation 1, groups 1.

use crate::error::Result;
use crate::weights::Vb;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: &Vb,
    ) -> Result<Self> {
        let weight = vb.get(&[out_ch, in_ch, kernel, kernel], "weight")?;
        let bias = Some(vb.get(&[out_ch], "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// From a `[out, in, k, k]` kernel and an optional `[out]` bias.
    pub fn from_tensors(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    /// # Shapes
    /// `[b, in, h, w]` -> `[b, out, h', w']`
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let tracked = |t: &Tensor| t.is_variable() || t.track_op();
        let trainable = tracked(&self.weight) || self.bias.as_ref().is_some_and(tracked);
        if !trainable && super::cpu_conv::supported(xs, &self.weight) {
            let value = self.cpu_value(xs)?;
            if !super::frozen::wants_frozen_path(xs) {
                return Ok(value);
            }
            // Frozen weights: backward to the input only.
            let (w, p, s) = (self.weight.clone(), self.padding, self.stride);
            let (h, wd) = (xs.dim(2)?, xs.dim(3)?);
            return super::frozen::attach(xs, value, move |g, _| {
                super::cpu_conv::input_grad(g, &w, p, s, h, wd)
            });
        }
        if !trainable && super::frozen::wants_frozen_path(xs) {
            let value = self.plain(&xs.detach())?;
            let (w, p, s) = (self.weight.clone(), self.padding, self.stride);
            let (h, wd) = (xs.dim(2)?, xs.dim(3)?);
            return super::frozen::attach(xs, value, move |g, _| {
                super::frozen::conv2d_input_grad(g, &w, p, s, h, wd)
            });
        }
        if trainable && super::cpu_conv::supported(xs, &self.weight) {
            return self.trainable_cpu(xs);
        }
        // No fast path: candle's differentiable conv2d.
        self.plain(xs)
    }

    /// The CPU kernel's output, without a graph.
    fn cpu_value(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        super::cpu_conv::forward(
            xs,
            &self.weight,
            self.bias.as_ref(),
            self.padding,
            self.stride,
        )
    }

    /// Trainable weights on the CPU: the fast forward, with a backward giving the input,
    /// kernel and bias gradients (the miniature world's models train through this).
    fn trainable_cpu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let value = self.cpu_value(xs)?;
        let bias = match &self.bias {
            Some(b) => b.clone(),
            // A stand-in operand; its gradient is computed but never used.
            None => Tensor::zeros(self.weight.dim(0)?, xs.dtype(), xs.device())?,
        };
        let (w, p, s) = (self.weight.clone(), self.padding, self.stride);
        let x = xs.detach();
        let wants_dx = xs.is_variable() || xs.track_op();
        super::frozen::attach3((xs, &self.weight, &bias), value, move |g| {
            let (h, wd) = (x.dim(2)?, x.dim(3)?);
            let dx = if wants_dx {
                super::cpu_conv::input_grad(g, &w, p, s, h, wd)?
            } else {
                x.zeros_like()?
            };
            let dw = super::cpu_conv::weight_grad(&x, g, w.dims4()?, p, s)?;
            let db = g.sum((0, 2, 3))?;
            Ok((dx, dw, db))
        })
    }

    fn plain(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => out.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(out),
        }
    }
}

/// diffusers' `Downsample2D` with a conv: a stride-2 3x3 conv. With padding 0 (the VAE, or
/// a UNet with `downsample_padding: 0`) the input is first padded by one on the right and
/// bottom only, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: &Vb) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 2, padding, &vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    /// # Shapes
    /// `[b, c, h, w]` -> `[b, c, ceil(h / 2), ceil(w / 2)]`
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_right_bottom {
            self.conv
                .forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
        } else {
            self.conv.forward(xs)
        }
    }
}
