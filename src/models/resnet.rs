//! diffusers' `ResnetBlock2D` (resnet_time_scale_shift "default", output_scale_factor 1),
//! shared by the UNet (with a time embedding) and the VAE (without).

use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::Vb;
use candle_core::Tensor;

#[derive(Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(cfg: &ResnetConfig, vb: &Vb) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        Ok(Self {
            norm1: GroupNorm::new(cfg.groups, i, cfg.eps, &vb.pp("norm1"))?,
            conv1: Conv2d::new(i, o, 3, 1, 1, &vb.pp("conv1"))?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(Linear::new(t, o, true, &vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: GroupNorm::new(cfg.groups, o, cfg.eps, &vb.pp("norm2"))?,
            conv2: Conv2d::new(o, o, 3, 1, 1, &vb.pp("conv2"))?,
            conv_shortcut: if i != o {
                Some(Conv2d::new(i, o, 1, 1, 0, &vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// # Shapes
    /// `xs`: `[b, in, h, w]`, `temb`: `[b, temb_channels]` -> `[b, out, h, w]`
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
