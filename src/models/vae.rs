//! diffusers' `AutoencoderKL` (diffusers 0.42.1): encoder to a diagonal Gaussian over latents,
//! decoder back to pixels, built from its config.json.

use crate::error::{Error, Result};
use crate::models::config::{parse_with_raw, require_defaults};
use crate::models::resnet::{ResnetBlock2D, ResnetConfig};
use crate::nn::attach::checkpoint;
use crate::nn::{attention, upsample_nearest_2x, Conv2d, Downsample2D, GroupNorm, Linear};
use crate::weights::Vb;
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(skip)]
    pub file: PathBuf,
}

fn d_three() -> usize {
    3
}
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_channels() -> Vec<usize> {
    vec![64]
}
fn d_groups() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(crate::error::read_json(path)?, path)
    }

    /// Parses and validates a config given as JSON; `path` names it in errors.
    pub fn from_value(value: serde_json::Value, path: &Path) -> Result<Self> {
        let (mut cfg, raw): (Self, _) = parse_with_raw(value, path)?;
        cfg.file = path.to_path_buf();
        require_defaults(
            &raw,
            path,
            &[
                ("act_fn", json!("silu")),
                ("shift_factor", json!(null)),
                ("latents_mean", json!(null)),
                ("latents_std", json!(null)),
            ],
        )?;
        let n = cfg.block_out_channels.len();
        if n == 0 {
            return Err(Error::unsupported(
                path,
                "block_out_channels",
                "[]",
                "needs at least one level",
            ));
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &cfg.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &cfg.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(Error::unsupported(
                    path,
                    key,
                    format!("{types:?}"),
                    "needs one entry per block_out_channels level",
                ));
            }
            if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                return Err(Error::unsupported(
                    path,
                    key,
                    t,
                    &format!("only {want} is supported"),
                ));
            }
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|&&c| cfg.norm_num_groups == 0 || !c.is_multiple_of(cfg.norm_num_groups))
        {
            return Err(Error::unsupported(
                path,
                "norm_num_groups",
                cfg.norm_num_groups,
                &format!("channel count {c} is not divisible by it"),
            ));
        }
        Ok(cfg)
    }

    /// Pixels per latent along each side: 2^(levels - 1).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The VAE's single-head spatial self-attention (diffusers' `Attention` with a group norm and
/// a residual connection).
#[derive(Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(c: usize, groups: usize, vb: &Vb) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(groups, c, 1e-6, &vb.pp("group_norm"))?,
            to_q: Linear::new(c, c, true, &vb.pp("to_q"))?,
            to_k: Linear::new(c, c, true, &vb.pp("to_k"))?,
            to_v: Linear::new(c, c, true, &vb.pp("to_v"))?,
            to_out: Linear::new(c, c, true, &vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let out = attention(
            &self.to_q.forward(&t)?,
            &self.to_k.forward(&t)?,
            &self.to_v.forward(&t)?,
            1,
            None,
        )?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` without a time embedding: resnet, attention, resnet.
#[derive(Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(c: usize, cfg: &VaeConfig, vb: &Vb) -> Result<Self> {
        let rc = resnet_cfg(c, c, cfg);
        Ok(Self {
            resnet0: ResnetBlock2D::new(&rc, &vb.pp("resnets.0"))?,
            attention: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(
                    c,
                    cfg.norm_num_groups,
                    &vb.pp("attentions.0"),
                )?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::new(&rc, &vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.resnet0.forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnet1.forward(&xs, None)
    }
}

fn resnet_cfg(i: usize, o: usize, cfg: &VaeConfig) -> ResnetConfig {
    ResnetConfig {
        in_channels: i,
        out_channels: o,
        temb_channels: None,
        groups: cfg.norm_num_groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

struct EncoderLevel {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

struct DecoderLevel {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<EncoderLevel>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: &Vb) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut down = vec![];
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vbb = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(&resnet_cfg(rin, out_c, cfg), &vbb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(out_c, 0, &vbb.pp("downsamplers.0"))?)
            } else {
                None
            };
            down.push(EncoderLevel {
                resnets,
                downsampler,
            });
        }
        Ok(Self {
            conv_in: Conv2d::new(cfg.in_channels, ch[0], 3, 1, 1, &vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(ch[n - 1], cfg, &vb.pp("mid_block"))?,
            norm_out: GroupNorm::new(
                cfg.norm_num_groups,
                ch[n - 1],
                1e-6,
                &vb.pp("conv_norm_out"),
            )?,
            conv_out: Conv2d::new(
                ch[n - 1],
                2 * cfg.latent_channels,
                3,
                1,
                1,
                &vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for level in &self.down {
            for r in &level.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(ds) = &level.downsampler {
                xs = ds.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

pub struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<DecoderLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// The mid block and each resnet recomputed in the backward instead of keeping their
    /// graphs ([`crate::nn::attach::checkpoint`]).
    checkpointing: bool,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: &Vb) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut up = vec![];
        let mut out_c = ch[n - 1];
        for i in 0..n {
            let prev_c = out_c;
            out_c = ch[n - 1 - i];
            let vbb = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev_c } else { out_c };
                    ResnetBlock2D::new(&resnet_cfg(rin, out_c, cfg), &vbb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Conv2d::new(
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                    &vbb.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            up.push(DecoderLevel { resnets, upsampler });
        }
        Ok(Self {
            conv_in: Conv2d::new(cfg.latent_channels, ch[n - 1], 3, 1, 1, &vb.pp("conv_in"))?,
            mid: MidBlock::new(ch[n - 1], cfg, &vb.pp("mid_block"))?,
            up,
            norm_out: GroupNorm::new(cfg.norm_num_groups, ch[0], 1e-6, &vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(ch[0], cfg.out_channels, 3, 1, 1, &vb.pp("conv_out"))?,
            checkpointing: false,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.conv_in.forward(z)?;
        let mut xs = if self.checkpointing {
            let mid = self.mid.clone();
            checkpoint(&xs, move |x| mid.forward(x))?
        } else {
            self.mid.forward(&xs)?
        };
        for level in &self.up {
            for r in &level.resnets {
                xs = if self.checkpointing {
                    let r = r.clone();
                    checkpoint(&xs, move |x| r.forward(x, None))?
                } else {
                    r.forward(&xs, None)?
                };
            }
            if let Some(us) = &level.upsampler {
                xs = us.forward(&upsample_nearest_2x(&xs)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// diffusers' `AutoencoderKL`.
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(cfg: VaeConfig, vb: &Vb) -> Result<Self> {
        let lc = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(&cfg, &vb.pp("encoder"))?,
            decoder: Decoder::new(&cfg, &vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(2 * lc, 2 * lc, 1, 1, 0, &vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(lc, lc, 1, 1, 0, &vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            cfg,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn scaling_factor(&self) -> f64 {
        self.cfg.scaling_factor
    }

    /// Activation checkpointing of the decoder's mid block and resnets on the graph path
    /// (gradients unchanged; no effect without a graph).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.decoder.checkpointing = on;
    }

    pub fn checkpointing(&self) -> bool {
        self.decoder.checkpointing
    }

    /// Decodes unscaled latents (divide by `scaling_factor` first) to raw, unclamped pixels.
    ///
    /// # Shapes
    /// `[b, latent_channels, h, w]` -> `[b, out_channels, h * f, w * f]`, f = 2^(levels - 1)
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        // Pixels in the latents' dtype (f32 under autocast).
        let out_dtype = z.dtype();
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        Ok(self.decoder.forward(&z)?.to_dtype(out_dtype)?)
    }

    /// The mean and log-variance of the latent distribution (unscaled).
    ///
    /// # Shapes
    /// `[b, in_channels, H, W]` -> two of `[b, latent_channels, H / f, W / f]`
    pub fn encode(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = self.cfg.downscale();
        let (_, _, h, w) = xs.dims4()?;
        if h % f != 0 || w % f != 0 {
            return Err(Error::Invalid(format!(
                "image size {h}x{w} must be divisible by {f} for this VAE"
            )));
        }
        let mut moments = self.encoder.forward(xs)?;
        if let Some(c) = &self.quant_conv {
            moments = c.forward(&moments)?;
        }
        let lc = self.cfg.latent_channels;
        let moments = moments.to_dtype(xs.dtype())?;
        let mean = moments.narrow(1, 0, lc)?;
        let logvar = moments.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }
}
