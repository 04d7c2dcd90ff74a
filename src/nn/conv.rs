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

    /// # Shapes
    /// `[b, in, h, w]` -> `[b, out, h', w']`
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => out.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(out),
        }
    }
}
