//! diffusers' `ControlNetModel` (Zhang et al. 2023): a trainable copy of a UNet's contracting
//! half, fed the noisy latents plus an embedding of a conditioning image (edges, depth, pose),
//! whose every skip connection and mid-block output passes through a 1x1 convolution and is
//! added, scaled, to the UNet's own ([`crate::models::unet::Residuals`]).

use crate::error::{Error, Result};
use crate::models::unet::{Residuals, UNetConfig, UNetEncoder};
use crate::nn::Conv2d;
use crate::weights::Vb;
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

/// A ControlNet's `config.json`: the UNet keys of its contracting half plus its own.
#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    pub unet: UNetConfig,
    /// Channels of the conditioning image (3).
    pub conditioning_channels: usize,
    /// Widths of the conditioning embedding's levels; each after the first halves the size.
    pub embedding_channels: Vec<usize>,
    /// The image is given to the network as BGR (`controlnet_conditioning_channel_order`).
    pub bgr: bool,
    /// Residuals averaged over space (shuffle-style ControlNets).
    pub global_pool: bool,
}

impl ControlNetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(crate::error::read_json(path)?, path)
    }

    pub fn from_value(value: Value, path: &Path) -> Result<Self> {
        let Value::Object(mut raw) = value else {
            return Err(Error::file(path, "a config must be a JSON object"));
        };
        let get = |k: &str| raw.get(k).filter(|v| !v.is_null()).cloned();
        let conditioning_channels = get("conditioning_channels")
            .map(serde_json::from_value::<usize>)
            .transpose()
            .map_err(|e| Error::file(path, format!("invalid conditioning_channels: {e}")))?
            .unwrap_or(3);
        let embedding_channels: Vec<usize> = get("conditioning_embedding_out_channels")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| {
                Error::file(
                    path,
                    format!("invalid conditioning_embedding_out_channels: {e}"),
                )
            })?
            .unwrap_or_else(|| vec![16, 32, 96, 256]);
        if embedding_channels.is_empty() || embedding_channels.contains(&0) {
            return Err(Error::unsupported(
                path,
                "conditioning_embedding_out_channels",
                format!("{embedding_channels:?}"),
                "needs at least one positive width",
            ));
        }
        let bgr = match get("controlnet_conditioning_channel_order") {
            None => false,
            Some(Value::String(s)) if s == "rgb" => false,
            Some(Value::String(s)) if s == "bgr" => true,
            Some(v) => {
                return Err(Error::unsupported(
                    path,
                    "controlnet_conditioning_channel_order",
                    v,
                    "rgb or bgr",
                ))
            }
        };
        let global_pool = get("global_pool_conditions") == Some(Value::Bool(true));
        // The contracting half as a UNet config: the up blocks it lacks mirror its down blocks.
        if !raw.contains_key("up_block_types") {
            let down: Vec<String> = get("down_block_types")
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| Error::file(path, format!("invalid down_block_types: {e}")))?
                .unwrap_or_else(|| {
                    ["CrossAttnDownBlock2D"; 3]
                        .into_iter()
                        .chain(["DownBlock2D"])
                        .map(String::from)
                        .collect()
                });
            let up: Vec<Value> = down
                .iter()
                .rev()
                .map(|t| Value::String(t.replace("Down", "Up")))
                .collect();
            raw.insert("up_block_types".into(), Value::Array(up));
        }
        let unet = UNetConfig::from_value(Value::Object(raw), path)?;
        Ok(Self {
            unet,
            conditioning_channels,
            embedding_channels,
            bgr,
            global_pool,
        })
    }

    /// How many times the conditioning embedding halves the image's size.
    pub fn downsamplings(&self) -> usize {
        self.embedding_channels.len() - 1
    }
}

/// `ControlNetConditioningEmbedding`: a small convolutional encoder from image pixels to the
/// latents' size and the UNet's first width, its last convolution zero-initialised in training.
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(cfg: &ControlNetConfig, vb: &Vb) -> Result<Self> {
        let ch = &cfg.embedding_channels;
        let mut blocks = vec![];
        for i in 0..ch.len() - 1 {
            blocks.push(Conv2d::new(
                ch[i],
                ch[i],
                3,
                1,
                1,
                &vb.pp("blocks").pp(2 * i),
            )?);
            blocks.push(Conv2d::new(
                ch[i],
                ch[i + 1],
                3,
                2,
                1,
                &vb.pp("blocks").pp(2 * i + 1),
            )?);
        }
        Ok(Self {
            conv_in: Conv2d::new(cfg.conditioning_channels, ch[0], 3, 1, 1, &vb.pp("conv_in"))?,
            blocks,
            conv_out: Conv2d::new(
                ch[ch.len() - 1],
                cfg.unet.block_out_channels[0],
                3,
                1,
                1,
                &vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(image)?.silu()?;
        for b in &self.blocks {
            xs = b.forward(&xs)?.silu()?;
        }
        self.conv_out.forward(&xs)
    }
}

pub struct ControlNetModel {
    encoder: UNetEncoder,
    cond: ConditioningEmbedding,
    /// One 1x1 convolution per skip connection of the contracting half.
    zero_down: Vec<Conv2d>,
    zero_mid: Conv2d,
    cfg: ControlNetConfig,
}

impl ControlNetModel {
    pub fn new(cfg: ControlNetConfig, vb: &Vb) -> Result<Self> {
        let encoder = UNetEncoder::new(cfg.unet.clone(), vb)?;
        let cond = ConditioningEmbedding::new(&cfg, &vb.pp("controlnet_cond_embedding"))?;
        // The widths of the skip connections, in order: conv_in's, then each level's layers and
        // (but the last level) its downsampler.
        let ch = &cfg.unet.block_out_channels;
        let layers = cfg.unet.layers_per_level()?;
        let mut widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, layers[i]));
            if i + 1 < ch.len() {
                widths.push(c);
            }
        }
        let zero_down = widths
            .iter()
            .enumerate()
            .map(|(k, &c)| Conv2d::new(c, c, 1, 1, 0, &vb.pp("controlnet_down_blocks").pp(k)))
            .collect::<Result<Vec<_>>>()?;
        let mid_c = ch[ch.len() - 1];
        let zero_mid = Conv2d::new(mid_c, mid_c, 1, 1, 0, &vb.pp("controlnet_mid_block"))?;
        Ok(Self {
            encoder,
            cond,
            zero_down,
            zero_mid,
            cfg,
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// The residuals for a UNet at timestep `timestep`, scaled by `scale` (in guess mode by
    /// 10^-1 ... 10^0 from the shallowest skip connection to the mid block, times `scale`).
    ///
    /// # Shapes
    /// `sample`: `[b, 4, h, w]`; `context`: `[b, 77, D]`; `image`: `[b, 3, 8h, 8w]` in [0, 1]
    /// (for SD's VAE; the embedding's downsampling must match the VAE's).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        image: &Tensor,
        scale: f64,
        guess_mode: bool,
    ) -> Result<Residuals> {
        let timesteps = vec![timestep; sample.dim(0)?];
        self.forward_each(sample, &timesteps, context, image, scale, guess_mode)
    }

    /// [`Self::forward`] with one timestep per batch row (training draws them independently).
    pub fn forward_each(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        image: &Tensor,
        scale: f64,
        guess_mode: bool,
    ) -> Result<Residuals> {
        let b = sample.dim(0)?;
        if timesteps.len() != b {
            return Err(Error::Invalid(format!(
                "ControlNet got {b} latents but {} timesteps",
                timesteps.len()
            )));
        }
        let (_, _, h, w) = sample.dims4()?;
        let f = 1usize << self.cfg.downsamplings();
        let (ih, iw) = (image.dim(2)?, image.dim(3)?);
        if (ih, iw) != (h * f, w * f) || image.dim(1)? != self.cfg.conditioning_channels {
            return Err(Error::Invalid(format!(
                "the control image is {}x{}x{ih}x{iw}, but this ControlNet needs {}x{}x{}x{} for {h}x{w} latents",
                image.dim(0)?,
                image.dim(1)?,
                b,
                self.cfg.conditioning_channels,
                h * f,
                w * f
            )));
        }
        let image = if self.cfg.bgr {
            Tensor::cat(
                &[
                    image.narrow(1, 2, 1)?,
                    image.narrow(1, 1, 1)?,
                    image.narrow(1, 0, 1)?,
                ],
                1,
            )?
        } else {
            image.clone()
        };
        let temb = self
            .encoder
            .time_embedding_each(timesteps, sample.dtype(), sample.device())?;
        let xs = self.encoder.conv_in.forward(sample)?;
        let cond = self.cond.forward(&image.to_dtype(xs.dtype())?)?;
        let xs = (xs + cond)?;
        let context = &crate::nn::context::stable(context)?;
        let (xs, skips) = self.encoder.forward_down(&xs, &temb, context, 1)?;
        let mid = self.encoder.mid.forward(&xs, &temb, context, 1)?;
        let n = skips.len();
        let scales: Vec<f64> = if guess_mode && !self.cfg.global_pool {
            // torch.logspace(-1, 0, n + 1): one scale per skip connection and the mid block.
            (0..=n)
                .map(|i| 10f64.powf(-1.0 + i as f64 / n as f64) * scale)
                .collect()
        } else {
            vec![scale; n + 1]
        };
        let pool = |t: Tensor| -> candle_core::Result<Tensor> {
            if self.cfg.global_pool {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.zero_down)
            .zip(&scales)
            .map(|((s, conv), &k)| pool((conv.forward(s)? * k)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = pool((self.zero_mid.forward(&mid)? * scales[n])?)?;
        Ok(Residuals { down, mid })
    }
}
