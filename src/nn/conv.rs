//! `torch.nn.Conv2d` with square kernels, symmetric padding, dilation 1, groups 1.

use super::attach;
use super::dispatch::{self, Grad};
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
        // Autocast: the input in the kernel's dtype (see `crate::precision`).
        let xs = &xs.to_dtype(self.weight.dtype())?;
        let weights: Vec<&Tensor> = std::iter::once(&self.weight).chain(&self.bias).collect();
        let plan = dispatch::plan(&[xs], &weights);
        let fused = plan.fused && super::cpu_conv::supported(xs, &self.weight);
        let (w, p, s) = (self.weight.clone(), self.padding, self.stride);
        let (h, wd) = (xs.dim(2)?, xs.dim(3)?);
        match (fused, plan.grad) {
            (true, Grad::None) => self.cpu_value(xs),
            // Frozen weights: backward to the input only.
            (true, Grad::InputOnly) => attach::attach(xs, self.cpu_value(xs)?, move |g, _| {
                super::cpu_conv::input_grad(g, &w, p, s, h, wd)
            }),
            (true, Grad::All) => self.trainable(xs, true),
            (false, Grad::None) => self.plain(xs),
            // The input gradient as a convolution (cuDNN's fast algorithms on a GPU), never
            // candle's conv_transpose2d, and no kernel gradient.
            (false, Grad::InputOnly) => {
                attach::attach(xs, self.plain(&xs.detach())?, move |g, _| {
                    conv2d_input_grad(g, &w, p, s, h, wd)
                })
            }
            // Trainable weights off the fused path: our own backward too (candle's conv2d
            // backward gives the input gradient a wrong shape for strided kernels on odd sizes).
            (false, Grad::All) => self.trainable(xs, false),
        }
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

    /// Trainable weights: the forward (fused or candle's), with a backward giving the input,
    /// kernel and bias gradients (the miniature world's models train through this).
    fn trainable(&self, xs: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let value = if fused {
            self.cpu_value(xs)?
        } else {
            self.plain(&xs.detach())?
        };
        let bias = match &self.bias {
            Some(b) => b.clone(),
            // A stand-in operand; its gradient is computed but never used.
            None => Tensor::zeros(self.weight.dim(0)?, xs.dtype(), xs.device())?,
        };
        let (w, p, s) = (self.weight.clone(), self.padding, self.stride);
        let x = xs.detach();
        let wants_dx = dispatch::tracked(xs);
        attach::attach3((xs, &self.weight, &bias), value, move |g| {
            let (h, wd) = (x.dim(2)?, x.dim(3)?);
            let dx = match (wants_dx, fused) {
                (false, _) => x.zeros_like()?,
                (true, true) => super::cpu_conv::input_grad(g, &w, p, s, h, wd)?,
                (true, false) => conv2d_input_grad(g, &w, p, s, h, wd)?,
            };
            let dw = if fused {
                super::cpu_conv::weight_grad(&x, g, w.dims4()?, p, s)?
            } else {
                conv2d_weight_grad(&x, g, w.dim(2)?, p, s)?
            };
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

/// Inserts `s - 1` zeros between the rows and columns of `[b, c, h, w]`.
fn dilate(g: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    if s == 1 {
        return Ok(g.clone());
    }
    let (b, c, h, w) = g.dims4()?;
    g.reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(3, 0, s - 1)?
        .pad_with_zeros(5, 0, s - 1)?
        .reshape((b, c, h * s, w * s))?
        .narrow(2, 0, (h - 1) * s + 1)?
        .narrow(3, 0, (w - 1) * s + 1)
}

/// The input gradient of `conv2d(x, kernel, padding, stride)` for an input of `in_h x in_w`,
/// device-generic: a convolution of the dilated, padded gradient with the flipped, transposed
/// kernel.
pub fn conv2d_input_grad(
    grad: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    in_h: usize,
    in_w: usize,
) -> candle_core::Result<Tensor> {
    let k = kernel.dim(2)?;
    // W'[in, out, i, j] = W[out, in, k-1-i, k-1-j]
    let flipped = kernel.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    // dx[i] = sum_j D[i + p - j] W[j] for the dilated gradient D: a valid correlation of D,
    // shifted by k - 1 - p (padded in front, or cropped where the padding exceeds k - 1), with
    // the flipped kernel, over in + k - 1 positions.
    let lead = k as isize - 1 - padding as isize;
    let d = dilate(grad, stride)?;
    let d = shift_to(&d, 2, lead, in_h + k - 1)?;
    let d = shift_to(&d, 3, lead, in_w + k - 1)?;
    d.conv2d(&flipped, 0, 1, 1, 1)
}

/// `t` along `dim` moved right by `lead` (zeros in front; a negative lead drops elements),
/// then cut or zero-padded to `len`.
fn shift_to(t: &Tensor, dim: usize, lead: isize, len: usize) -> candle_core::Result<Tensor> {
    let t = if lead >= 0 {
        t.pad_with_zeros(dim, lead as usize, 0)?
    } else {
        let drop = (lead.unsigned_abs()).min(t.dim(dim)?);
        t.narrow(dim, drop, t.dim(dim)? - drop)?
    };
    let have = t.dim(dim)?;
    if have >= len {
        t.narrow(dim, 0, len)
    } else {
        t.pad_with_zeros(dim, 0, len - have)
    }
}

/// The kernel gradient of `conv2d(x, kernel, padding, stride)` for a `k x k` kernel given the
/// output gradient `g`, device-generic: dW[o, i, a, b] = sum over n, y, x of
/// g[n, o, y, x] xpad[n, i, s y + a, s x + b], a convolution of the padded input (batch and
/// channels swapped) with the output gradient as a kernel dilated by the stride.
pub fn conv2d_weight_grad(
    x: &Tensor,
    g: &Tensor,
    k: usize,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let xt = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?
        .transpose(0, 1)?
        .contiguous()?;
    let gt = g.transpose(0, 1)?.contiguous()?;
    let dwt = xt.conv2d(&gt, 0, 1, stride, 1)?;
    dwt.narrow(2, 0, k)?
        .narrow(3, 0, k)?
        .transpose(0, 1)?
        .contiguous()
}
