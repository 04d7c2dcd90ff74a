//! diffusers' `UNet2DConditionModel` (diffusers 0.42.1) for the Stable Diffusion 1.x / 2.x
//! block types, and its `UNet3DConditionModel` (ModelScope / ZeroScope text-to-video), built
//! from their config.json. Unsupported config values are rejected by name.
//!
//! The video UNet is the image UNet with temporal layers ([`crate::models::temporal`]) after
//! each resnet and each spatial transformer, and one temporal transformer after `conv_in`; it
//! runs the frames as a batch, so one set of blocks serves both.

use crate::error::{Error, Result};
use crate::models::config::{parse_with_raw, require_defaults, IntOrList};
use crate::models::resnet::{ResnetBlock2D, ResnetConfig};
use crate::models::temporal::{TemporalConvLayer, TransformerTemporalModel};
use crate::models::transformer::{Transformer2DModel, TransformerConfig};
use crate::nn::{
    upsample_nearest_2x, upsample_nearest_to, Conv2d, Downsample2D, GroupNorm, Linear,
};
use crate::weights::Vb;
use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: IntOrList,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: IntOrList,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: IntOrList,
    #[serde(default = "d_head")]
    pub attention_head_dim: IntOrList,
    #[serde(default)]
    pub num_attention_heads: Option<IntOrList>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// diffusers' flag for attention scores in f32; reneg always computes half-precision
    /// scores in f32 (`nn::attention`), so it is read and changes nothing.
    #[serde(default)]
    pub upcast_attention: bool,
    /// SDXL's added conditioning, `"text_time"`: the pooled text and six size ids, embedded
    /// and added to the time embedding ([`TextTimeEmbedding`]).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(skip)]
    pub file: PathBuf,
    /// A `UNet3DConditionModel`: latents `[b, c, frames, h, w]`, temporal layers.
    #[serde(skip)]
    pub video: bool,
}

/// `UNet3DConditionModel`'s defaults where they differ from `UNet2DConditionModel`'s.
fn video_defaults() -> [(&'static str, serde_json::Value); 4] {
    [
        (
            "down_block_types",
            json!([
                "CrossAttnDownBlock3D",
                "CrossAttnDownBlock3D",
                "CrossAttnDownBlock3D",
                "DownBlock3D"
            ]),
        ),
        (
            "up_block_types",
            json!([
                "UpBlock3D",
                "CrossAttnUpBlock3D",
                "CrossAttnUpBlock3D",
                "CrossAttnUpBlock3D"
            ]),
        ),
        ("cross_attention_dim", json!(1024)),
        ("attention_head_dim", json!(64)),
    ]
}

/// Whether a UNet config describes diffusers' `UNet3DConditionModel`: by its class name, or
/// (for configs without one) by its block types.
fn is_video_config(raw: &serde_json::Map<String, serde_json::Value>) -> bool {
    if let Some(name) = raw.get("_class_name").and_then(|v| v.as_str()) {
        return name == "UNet3DConditionModel";
    }
    ["down_block_types", "up_block_types"].iter().any(|k| {
        raw.get(*k).and_then(|v| v.as_array()).is_some_and(|a| {
            a.iter()
                .any(|t| t.as_str().is_some_and(|t| t.ends_with("3D")))
        })
    })
}

fn d_four() -> usize {
    4
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> IntOrList {
    IntOrList::Int(2)
}
fn d_one() -> IntOrList {
    IntOrList::Int(1)
}
fn d_cross() -> IntOrList {
    IntOrList::Int(1280)
}
fn d_head() -> IntOrList {
    IntOrList::Int(8)
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_one_usize() -> usize {
    1
}
fn d_scale() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}

/// The per-level settings resolved from the config, in down-block order.
#[derive(Debug, Clone)]
struct Levels {
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_dim: Vec<usize>,
    heads: Vec<usize>,
    cross_attn: Vec<bool>,
    groups: usize,
    video: bool,
}

impl Levels {
    /// A resnet of the UNet (or ControlNet) from `i` to `o` channels.
    fn resnet(&self, cfg: &UNetConfig, i: usize, o: usize, scale: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: Some(cfg.block_out_channels[0] * 4),
            groups: self.groups,
            eps: cfg.norm_eps,
            output_scale_factor: scale,
        }
    }

    /// The (heads, head dim) of the transformers of `c` channels at `level`. diffusers'
    /// `attention_head_dim` is the head count of the image UNet's transformers (a legacy name),
    /// but the video UNet's blocks pass it on as the head dimension.
    fn heads(&self, c: usize, level: usize) -> (usize, usize) {
        let n = self.heads[level];
        if self.video {
            (c / n, n)
        } else {
            (n, c / n)
        }
    }

    /// The transformer of `c` channels at `level`.
    fn transformer(&self, cfg: &UNetConfig, c: usize, level: usize) -> TransformerConfig {
        let (heads, head_dim) = self.heads(c, level);
        TransformerConfig {
            channels: c,
            heads,
            head_dim,
            layers: self.transformer_layers[level],
            cross_attention_dim: self.cross_dim[level],
            groups: self.groups,
            use_linear_projection: cfg.use_linear_projection,
        }
    }

    /// The temporal layers after a resnet (and transformer) of `c` channels at `level`: none
    /// in an image UNet.
    /// `vb` is the block's; `j` the layer's index in it.
    fn temporal(
        &self,
        c: usize,
        level: usize,
        attention: bool,
        vb: &Vb,
        j: usize,
    ) -> Result<Temporal> {
        if !self.video {
            return Ok(Temporal::default());
        }
        let (heads, head_dim) = self.heads(c, level);
        Ok(Temporal {
            conv: Some(TemporalConvLayer::new(
                c,
                self.groups,
                &vb.pp("temp_convs").pp(j),
            )?),
            attention: if attention {
                Some(TransformerTemporalModel::new(
                    c,
                    heads,
                    head_dim,
                    self.groups,
                    &vb.pp("temp_attentions").pp(j),
                )?)
            } else {
                None
            },
        })
    }
}

/// The temporal layers of one layer of a video UNet block (none in an image UNet).
#[derive(Clone, Default)]
pub struct Temporal {
    conv: Option<TemporalConvLayer>,
    attention: Option<TransformerTemporalModel>,
}

impl UNetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(crate::error::read_json(path)?, path)
    }

    /// Parses and validates a config given as JSON; `path` names it in errors.
    pub fn from_value(mut value: serde_json::Value, path: &Path) -> Result<Self> {
        let video = value.as_object().is_some_and(is_video_config);
        if let (true, Some(map)) = (video, value.as_object_mut()) {
            for (k, v) in video_defaults() {
                map.entry(k).or_insert(v);
            }
        }
        let (mut cfg, raw): (Self, _) = parse_with_raw(value, path)?;
        cfg.file = path.to_path_buf();
        cfg.video = video;
        if video {
            // Not keys of UNet3DConditionModel: what its blocks always do.
            cfg.use_linear_projection = true;
            cfg.upcast_attention = false;
            cfg.flip_sin_to_cos = true;
            cfg.freq_shift = 0.0;
            if let IntOrList::List(l) = &cfg.attention_head_dim {
                // transformer_in is built with it as one head dimension.
                return Err(Error::unsupported(
                    path,
                    "attention_head_dim",
                    format!("{l:?}"),
                    "UNet3DConditionModel takes one int here",
                ));
            }
        }
        require_defaults(
            &raw,
            path,
            &[
                ("act_fn", json!("silu")),
                ("center_input_sample", json!(false)),
                ("class_embed_type", json!(null)),
                ("encoder_hid_dim", json!(null)),
                ("encoder_hid_dim_type", json!(null)),
                ("time_cond_proj_dim", json!(null)),
                ("time_embedding_type", json!("positional")),
                ("time_embedding_dim", json!(null)),
                ("time_embedding_act_fn", json!(null)),
                ("timestep_post_act", json!(null)),
                ("num_class_embeds", json!(null)),
                ("class_embeddings_concat", json!(false)),
                ("only_cross_attention", json!(false)),
                ("dual_cross_attention", json!(false)),
                ("resnet_time_scale_shift", json!("default")),
                ("resnet_skip_time_act", json!(false)),
                ("resnet_out_scale_factor", json!(1.0)),
                ("conv_in_kernel", json!(3)),
                ("conv_out_kernel", json!(3)),
                ("mid_block_type", json!("UNetMidBlock2DCrossAttn")),
                ("mid_block_only_cross_attention", json!(null)),
                ("cross_attention_norm", json!(null)),
                ("attention_type", json!("default")),
                ("reverse_transformer_layers_per_block", json!(null)),
            ],
        )?;
        match cfg.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if cfg.addition_time_embed_dim.is_some()
                    && cfg.projection_class_embeddings_input_dim.is_some() => {}
            Some("text_time") => {
                return Err(Error::file(
                    path,
                    "addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                ))
            }
            Some(other) => {
                return Err(Error::unsupported(
                    path,
                    "addition_embed_type",
                    other,
                    "only null and \"text_time\" (SDXL) are supported",
                ))
            }
        }
        if let Some(n) = &cfg.num_attention_heads {
            // diffusers itself refuses this key for UNet2DConditionModel (naming issue).
            return Err(Error::unsupported(
                path,
                "num_attention_heads",
                format!("{n:?}"),
                "UNet2DConditionModel takes the head count from attention_head_dim; remove the key",
            ));
        }
        cfg.levels()?;
        Ok(cfg)
    }

    fn levels(&self) -> Result<Levels> {
        let f = &self.file;
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::unsupported(
                f,
                "block_out_channels",
                "[]",
                "needs at least one level",
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::unsupported(
                f,
                "down_block_types",
                format!("{:?}", self.down_block_types),
                "down_block_types, up_block_types and block_out_channels must have the same length",
            ));
        }
        let d = if self.video { "3D" } else { "2D" };
        let (cross_down, plain_down) = (format!("CrossAttnDownBlock{d}"), format!("DownBlock{d}"));
        let (cross_up, plain_up) = (format!("CrossAttnUpBlock{d}"), format!("UpBlock{d}"));
        let mut cross_attn = Vec::with_capacity(n);
        for t in &self.down_block_types {
            if *t != cross_down && *t != plain_down {
                return Err(Error::unsupported(
                    f,
                    "down_block_types",
                    t,
                    &format!("supported: {cross_down}, {plain_down}"),
                ));
            }
            cross_attn.push(*t == cross_down);
        }
        for t in &self.up_block_types {
            if *t != cross_up && *t != plain_up {
                return Err(Error::unsupported(
                    f,
                    "up_block_types",
                    t,
                    &format!("supported: {cross_up}, {plain_up}"),
                ));
            }
        }
        let groups = self.norm_num_groups.ok_or_else(|| {
            Error::unsupported(f, "norm_num_groups", "null", "group norm is required")
        })?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if groups == 0 || !c.is_multiple_of(groups) {
                return Err(Error::unsupported(
                    f,
                    "norm_num_groups",
                    groups,
                    &format!("block_out_channels[{i}] = {c} is not divisible by it"),
                ));
            }
        }
        let heads = self
            .attention_head_dim
            .per_level(n, "attention_head_dim", f)?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || !c.is_multiple_of(h) {
                let meaning = if self.video {
                    "as the head dimension (UNet3DConditionModel's meaning)"
                } else {
                    "as the number of heads (diffusers' legacy meaning)"
                };
                return Err(Error::unsupported(
                    f,
                    "attention_head_dim",
                    h,
                    &format!("{meaning} it must divide block_out_channels[{i}] = {c}"),
                ));
            }
        }
        Ok(Levels {
            layers: self.layers_per_block.per_level(n, "layers_per_block", f)?,
            transformer_layers: self.transformer_layers_per_block.per_level(
                n,
                "transformer_layers_per_block",
                f,
            )?,
            cross_dim: self
                .cross_attention_dim
                .per_level(n, "cross_attention_dim", f)?,
            heads,
            cross_attn,
            groups,
            video: self.video,
        })
    }

    /// The width of the text embeddings the UNet attends to (the last level's, as diffusers).
    /// Resnet layers per level of the contracting half.
    pub fn layers_per_level(&self) -> Result<Vec<usize>> {
        Ok(self.levels()?.layers)
    }

    pub fn context_dim(&self) -> usize {
        let n = self.block_out_channels.len();
        self.cross_attention_dim
            .per_level(n, "cross_attention_dim", &self.file)
            .map(|v| v[n - 1])
            .unwrap_or(0)
    }

    /// Number of 2x downsamplings between the latents and the UNet's bottleneck.
    pub fn downsamplings(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }
}

/// One level of the UNet: resnets, optional cross-attention transformers, optional resampler
/// (diffusers' CrossAttnDownBlock2D / DownBlock2D, or CrossAttnUpBlock2D / UpBlock2D).
pub struct UNetBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    /// One per resnet in a video UNet, empty in an image UNet.
    temporal: Vec<Temporal>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Conv2d>,
    /// Each layer (resnet + transformer) recomputed in the backward instead of keeping its
    /// graph ([`crate::nn::attach::checkpoint2`]).
    checkpointing: bool,
}

impl UNetBlock {
    fn layer(
        &self,
        j: usize,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> candle_core::Result<Tensor> {
        let (resnet, attn, temporal, temb) = (
            self.resnets[j].clone(),
            self.attentions.get(j).cloned(),
            self.temporal.get(j).cloned().unwrap_or_default(),
            temb.clone(),
        );
        let layer = move |xs: &Tensor, ctx: &Tensor| {
            let xs = resnet.forward(xs, Some(&temb))?;
            let xs = temporal.conv(&xs, frames)?;
            match &attn {
                Some(attn) => temporal.attend(&attn.forward(&xs, ctx)?, frames),
                None => Ok(xs),
            }
        };
        if self.checkpointing {
            crate::nn::attach::checkpoint2(xs, ctx, layer)
        } else {
            layer(xs, ctx)
        }
    }

    /// A down block: returns the output and the skip connections it adds, in order.
    ///
    /// # Shapes
    /// `xs`: `[b, in, h, w]`, `temb`: `[b, 4 * c0]`, `ctx`: `[b, m, cross_dim]`
    /// -> `[b, out, h / 2, w / 2]` (or `h, w` for the last level). In a video UNet b is
    /// videos x `frames`, each video's frames consecutive; `frames` is 1 for images.
    pub fn forward_down(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = vec![];
        for j in 0..self.resnets.len() {
            xs = self.layer(j, &xs, temb, ctx, frames)?;
            skips.push(xs.clone());
        }
        if let Some(ds) = &self.downsampler {
            xs = ds.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }

    /// An up block: consumes one skip connection per resnet from the end of `skips`.
    ///
    /// # Shapes
    /// `xs`: `[b, prev, h, w]` -> `[b, out, 2h, 2w]` (or `h, w` for the last level)
    pub fn forward_up(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for j in 0..self.resnets.len() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("up block ran out of skip connections".into())
            })?;
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = self.layer(j, &xs, temb, ctx, frames)?;
        }
        if let Some(us) = &self.upsampler {
            // diffusers' `forward_upsample_size`: to the size of the skip the next block takes
            // first (2x unless the latents are not a multiple of the downsampling).
            let (_, _, h, w) = xs.dims4()?;
            let up = match skips.last().map(|s| s.dims4()).transpose()? {
                Some((_, _, sh, sw)) if (sh, sw) != (2 * h, 2 * w) => {
                    upsample_nearest_to(&xs, sh, sw)?
                }
                _ => upsample_nearest_2x(&xs)?,
            };
            xs = us.forward(&up)?;
        }
        Ok(xs)
    }
}

impl Temporal {
    /// The temporal convolution after a resnet (identity in an image UNet).
    fn conv(&self, xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        match &self.conv {
            Some(c) => c.forward(xs, frames),
            None => Ok(xs.clone()),
        }
    }

    /// The temporal transformer after a spatial one (identity in an image UNet).
    fn attend(&self, xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        match &self.attention {
            Some(a) => a.forward(xs, frames),
            None => Ok(xs.clone()),
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet; `UNetMidBlock3DCrossAttn` puts a
/// temporal convolution after each resnet and a temporal transformer after the transformer.
#[derive(Clone)]
pub struct UNetMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Transformer2DModel,
    /// The temporal layers after the first resnet (convolution and transformer) and after the
    /// second (convolution only); defaults in an image UNet.
    temporal: [Temporal; 2],
    checkpointing: bool,
}

impl UNetMidBlock {
    /// # Shapes
    /// `xs`: `[b, c, h, w]` -> same (b = videos x `frames` in a video UNet)
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> candle_core::Result<Tensor> {
        if self.checkpointing {
            let (block, temb) = (
                Self {
                    checkpointing: false,
                    ..self.clone()
                },
                temb.clone(),
            );
            return crate::nn::attach::checkpoint2(xs, ctx, move |x, c| {
                block.forward(x, &temb, c, frames)
            });
        }
        let xs = self.resnets[0].forward(xs, Some(temb))?;
        let xs = self.temporal[0].conv(&xs, frames)?;
        let xs = self.attention.forward(&xs, ctx)?;
        let xs = self.temporal[0].attend(&xs, frames)?;
        let xs = self.resnets[1].forward(&xs, Some(temb))?;
        self.temporal[1].conv(&xs, frames)
    }
}

/// The UNet's contracting half: input convolution, time embedding, down blocks and mid
/// block. A ControlNet is this half of a UNet with its own weights (`models::controlnet`).
pub struct UNetEncoder {
    pub(crate) conv_in: Conv2d,
    /// A video UNet's temporal transformer right after `conv_in`.
    transformer_in: Option<TransformerTemporalModel>,
    time_linear_1: Linear,
    time_linear_2: Linear,
    pub(crate) down: Vec<UNetBlock>,
    pub(crate) mid: UNetMidBlock,
    cfg: UNetConfig,
}

/// Residuals a ControlNet adds to a UNet: one per skip connection (in the UNet's order) and one
/// to the mid block's output.
#[derive(Debug, Clone)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// The sum of several ControlNets' residuals (diffusers' `MultiControlNetModel`).
    pub fn add(&self, other: &Residuals) -> candle_core::Result<Residuals> {
        Ok(Residuals {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
            mid: (&self.mid + &other.mid)?,
        })
    }

    /// Residuals of batch rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Residuals> {
        Ok(Residuals {
            down: self
                .down
                .iter()
                .map(|t| t.narrow(0, start, len))
                .collect::<candle_core::Result<_>>()?,
            mid: self.mid.narrow(0, start, len)?,
        })
    }

    /// Rows of `parts` stacked in order.
    pub fn cat(parts: &[&Residuals]) -> candle_core::Result<Residuals> {
        let n = parts.first().map_or(0, |p| p.down.len());
        Ok(Residuals {
            down: (0..n)
                .map(|i| Tensor::cat(&parts.iter().map(|p| &p.down[i]).collect::<Vec<_>>(), 0))
                .collect::<candle_core::Result<_>>()?,
            mid: Tensor::cat(&parts.iter().map(|p| &p.mid).collect::<Vec<_>>(), 0)?,
        })
    }

    /// Zero residuals of the same shapes (guess mode's unconditional branch).
    pub fn zeros_like(&self) -> candle_core::Result<Residuals> {
        Ok(Residuals {
            down: self
                .down
                .iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            mid: self.mid.zeros_like()?,
        })
    }
}

impl UNetEncoder {
    /// The down and mid blocks of `cfg` under `vb` (a UNet's or a ControlNet's weights, which
    /// share these names).
    pub fn new(cfg: UNetConfig, vb: &Vb) -> Result<Self> {
        let lv = cfg.levels()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let resnet = |i: usize, o: usize, scale: f64| lv.resnet(&cfg, i, o, scale);
        let transformer = |c: usize, level: usize| lv.transformer(&cfg, c, level);

        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vbb = vb.pp("down_blocks").pp(i);
            let mut resnets = vec![];
            let mut attentions = vec![];
            let mut temporal = vec![];
            for j in 0..lv.layers[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &resnet(rin, out_c, 1.0),
                    &vbb.pp("resnets").pp(j),
                )?);
                if lv.cross_attn[i] {
                    attentions.push(Transformer2DModel::new(
                        &transformer(out_c, i),
                        &vbb.pp("attentions").pp(j),
                    )?);
                }
                temporal.push(lv.temporal(out_c, i, lv.cross_attn[i], &vbb, j)?);
            }
            let downsampler = if i + 1 < n {
                let p = cfg.downsample_padding;
                Some(Downsample2D::new(out_c, p, &vbb.pp("downsamplers.0"))?)
            } else {
                None
            };
            down.push(UNetBlock {
                resnets,
                attentions,
                temporal,
                downsampler,
                upsampler: None,
                checkpointing: false,
            });
        }

        let mid = vb.pp("mid_block");
        let c = ch[n - 1];
        let s = cfg.mid_block_scale_factor;
        let mid = UNetMidBlock {
            resnets: [
                ResnetBlock2D::new(&resnet(c, c, s), &mid.pp("resnets.0"))?,
                ResnetBlock2D::new(&resnet(c, c, s), &mid.pp("resnets.1"))?,
            ],
            attention: Transformer2DModel::new(&transformer(c, n - 1), &mid.pp("attentions.0"))?,
            temporal: [
                lv.temporal(c, n - 1, true, &mid, 0)?,
                lv.temporal(c, n - 1, false, &mid, 1)?,
            ],
            checkpointing: false,
        };
        let transformer_in = if lv.video {
            // diffusers: 8 heads of `attention_head_dim` (here a head dimension), whatever the
            // channel count.
            Some(TransformerTemporalModel::new(
                ch[0],
                8,
                lv.heads[0],
                lv.groups,
                &vb.pp("transformer_in"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv_in: Conv2d::new(cfg.in_channels, ch[0], 3, 1, 1, &vb.pp("conv_in"))?,
            transformer_in,
            time_linear_1: Linear::new(ch[0], temb_dim, true, &vb.pp("time_embedding.linear_1"))?,
            time_linear_2: Linear::new(
                temb_dim,
                temb_dim,
                true,
                &vb.pp("time_embedding.linear_2"),
            )?,
            down,
            mid,
            cfg,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The time embedding of one timestep per batch row: `[b]` -> `[b, 4 * c0]`.
    pub fn time_embedding_each(
        &self,
        timesteps: &[f64],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let t = time_features(&self.cfg, timesteps, dtype, dev)?;
        self.time_linear_2
            .forward(&self.time_linear_1.forward(&t)?.silu()?)
    }

    /// `conv_in`, and in a video UNet `transformer_in`: `[b, in, h, w]` -> `[b, c0, h, w]`.
    pub fn forward_in(&self, sample: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        let xs = self.conv_in.forward(sample)?;
        match &self.transformer_in {
            Some(t) => t.forward(&xs, frames),
            None => Ok(xs),
        }
    }

    /// The down blocks from `xs` (after `conv_in`, and for a ControlNet its conditioning):
    /// the last level's output and every skip connection, `xs` first.
    pub fn forward_down(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            let (out, s) = block.forward_down(&xs, temb, ctx, frames)?;
            xs = out;
            skips.extend(s);
        }
        Ok((xs, skips))
    }
}

/// Checks a batch of latents against a config: sizes divisible by its downsampling, one
/// timestep and one context per row.
fn check_inputs(
    cfg: &UNetConfig,
    sample: &Tensor,
    timesteps: &[f64],
    context: &Tensor,
    what: &str,
) -> Result<()> {
    let (b, h, w) = match (cfg.video, sample.dims()) {
        (false, &[b, _, h, w]) | (true, &[b, _, _, h, w]) => (b, h, w),
        (video, dims) => {
            return Err(Error::Invalid(format!(
                "{what} takes latents [batch, channels, {}height, width], got {dims:?}",
                if video { "frames, " } else { "" }
            )))
        }
    };
    if timesteps.len() != b {
        return Err(Error::Invalid(format!(
            "{what} got {b} latents but {} timesteps",
            timesteps.len()
        )));
    }
    // An image UNet takes any size (upsampling to its skips' sizes, as diffusers); the video
    // UNets (ModelScope, lvdm) keep to multiples.
    let factor = 1usize << cfg.downsamplings();
    if cfg.video && (h % factor != 0 || w % factor != 0) {
        return Err(Error::Invalid(format!(
            "latent size {h}x{w} must be divisible by {factor} for this {what}; choose a height and width divisible by {}",
            factor * 8
        )));
    }
    if context.dim(0)? != b {
        return Err(Error::Invalid(format!(
            "{what} got {b} latents but {} text embeddings",
            context.dim(0)?
        )));
    }
    Ok(())
}

/// diffusers' `UNet2DConditionModel`, or with a video config (`UNetConfig::video`) its
/// `UNet3DConditionModel`, which takes latents `[b, c, frames, h, w]`.
pub struct UNet2DConditionModel {
    enc: UNetEncoder,
    up: Vec<UNetBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// SDXL's `add_embedding` (`addition_embed_type: "text_time"`).
    text_time: Option<TextTimeEmbedding>,
}

/// SDXL's added conditioning (diffusers' `get_aug_embed` for `text_time`): each of six size
/// ids (original h, w; crop top, left; target h, w) through the timestep's sinusoid of
/// `addition_time_embed_dim` channels, after the pooled text embedding, through
/// `add_embedding` (Linear, SiLU, Linear); the result is added to the time embedding.
pub struct TextTimeEmbedding {
    time_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

impl TextTimeEmbedding {
    fn new(cfg: &UNetConfig, vb: &Vb) -> Result<Option<Self>> {
        let (Some(time_dim), Some(input)) = (
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) else {
            return Ok(None);
        };
        let temb = cfg.block_out_channels[0] * 4;
        Ok(Some(Self {
            time_dim,
            linear_1: Linear::new(input, temb, true, &vb.pp("add_embedding.linear_1"))?,
            linear_2: Linear::new(temb, temb, true, &vb.pp("add_embedding.linear_2"))?,
        }))
    }

    /// `text_embeds` `[b, P]` and one row of six ids per sample -> `[b, 4 * c0]`.
    pub fn forward(
        &self,
        cfg: &UNetConfig,
        text_embeds: &Tensor,
        time_ids: &[[f64; 6]],
    ) -> Result<Tensor> {
        let b = text_embeds.dim(0)?;
        if time_ids.len() != b {
            return Err(Error::Invalid(format!(
                "{b} pooled embeddings but {} rows of size ids",
                time_ids.len()
            )));
        }
        let flat: Vec<f64> = time_ids.iter().flatten().copied().collect();
        let (dtype, dev) = (text_embeds.dtype(), text_embeds.device());
        let ids = sinusoid(
            &flat,
            self.time_dim,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
            dtype,
            dev,
        )?
        .reshape((b, 6 * self.time_dim))?;
        let x = Tensor::cat(&[text_embeds, &ids], 1)?;
        Ok(self.linear_2.forward(&self.linear_1.forward(&x)?.silu()?)?)
    }
}

impl UNet2DConditionModel {
    pub fn new(cfg: UNetConfig, vb: &Vb) -> Result<Self> {
        let enc = UNetEncoder::new(cfg.clone(), vb)?;
        let lv = cfg.levels()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let resnet = |i: usize, o: usize, scale: f64| lv.resnet(&cfg, i, o, scale);
        let transformer = |c: usize, level: usize| lv.transformer(&cfg, c, level);

        let mut up = Vec::with_capacity(n);
        let mut out_c = ch[n - 1];
        for i in 0..n {
            let level = n - 1 - i;
            let prev_c = out_c;
            out_c = ch[level];
            let skip_in_c = ch[level.saturating_sub(1)];
            let is_cross = cfg.up_block_types[i].starts_with("CrossAttn");
            let vbb = vb.pp("up_blocks").pp(i);
            let layers = lv.layers[level] + 1;
            let mut resnets = vec![];
            let mut attentions = vec![];
            let mut temporal = vec![];
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_in_c } else { out_c };
                let rin = if j == 0 { prev_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &resnet(rin + skip, out_c, 1.0),
                    &vbb.pp("resnets").pp(j),
                )?);
                if is_cross {
                    attentions.push(Transformer2DModel::new(
                        &transformer(out_c, level),
                        &vbb.pp("attentions").pp(j),
                    )?);
                }
                temporal.push(lv.temporal(out_c, level, is_cross, &vbb, j)?);
            }
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
            up.push(UNetBlock {
                resnets,
                attentions,
                temporal,
                downsampler: None,
                upsampler,
                checkpointing: false,
            });
        }

        Ok(Self {
            enc,
            up,
            conv_norm_out: GroupNorm::new(lv.groups, ch[0], cfg.norm_eps, &vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(ch[0], cfg.out_channels, 3, 1, 1, &vb.pp("conv_out"))?,
            text_time: TextTimeEmbedding::new(&cfg, vb)?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.enc.cfg
    }

    /// SDXL's added embedding of `text_embeds` `[b, P]` and `time_ids` (one row a sample),
    /// for [`Self::forward_added`]; an error for a UNet without `text_time`.
    pub fn text_time_embedding(
        &self,
        text_embeds: &Tensor,
        time_ids: &[[f64; 6]],
    ) -> Result<Tensor> {
        match &self.text_time {
            Some(e) => e.forward(&self.enc.cfg, text_embeds, time_ids),
            None => Err(Error::Invalid(
                "this UNet has no added text/time conditioning (not an SDXL UNet)".into(),
            )),
        }
    }

    /// The contracting half (conv_in, time embedding, down and mid blocks).
    pub fn encoder(&self) -> &UNetEncoder {
        &self.enc
    }

    pub fn down_blocks(&self) -> &[UNetBlock] {
        &self.enc.down
    }

    pub fn mid_block(&self) -> &UNetMidBlock {
        &self.enc.mid
    }

    pub fn up_blocks(&self) -> &[UNetBlock] {
        &self.up
    }

    /// The time embedding (sinusoidal features through `time_embedding`): `[b, 4 * c0]`.
    pub fn time_embedding(
        &self,
        timestep: f64,
        batch: usize,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        self.time_embedding_each(&vec![timestep; batch], dtype, dev)
    }

    /// The time embedding of one timestep per batch row: `[b]` -> `[b, 4 * c0]`.
    pub fn time_embedding_each(
        &self,
        timesteps: &[f64],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        self.enc.time_embedding_each(timesteps, dtype, dev)
    }

    /// One noise (or v) prediction.
    ///
    /// # Shapes
    /// `sample`: `[b, in_channels, h, w]` with h, w divisible by 2^(levels-1);
    /// `context`: `[b, 77, cross_attention_dim]` -> `[b, out_channels, h, w]`
    /// Activation checkpointing of every UNet layer (resnet + transformer, and the mid block)
    /// on the graph path: the backward recomputes each layer instead of keeping its
    /// activations. Gradients are unchanged; no effect without a graph.
    pub fn set_checkpointing(&mut self, on: bool) {
        for b in self.enc.down.iter_mut().chain(self.up.iter_mut()) {
            b.checkpointing = on;
        }
        self.enc.mid.checkpointing = on;
    }

    pub fn checkpointing(&self) -> bool {
        self.enc.mid.checkpointing
    }

    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let b = sample.dim(0)?;
        self.forward_each(sample, &vec![timestep; b], context)
    }

    /// [`Self::forward`] with one timestep per batch row (training draws them independently).
    pub fn forward_each(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// [`Self::forward_each`] with a ControlNet's residuals added to the skip connections and
    /// the mid block's output (diffusers' `down_block_additional_residuals` and
    /// `mid_block_additional_residual`).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        residuals: Option<&Residuals>,
    ) -> Result<Tensor> {
        check_inputs(&self.enc.cfg, sample, timesteps, context, "UNet")?;
        if self.text_time.is_some() {
            return Err(Error::Invalid(
                "an SDXL UNet needs its added conditioning (pooled text and size ids): run it through its family's denoiser".into(),
            ));
        }
        if self.enc.cfg.video {
            if residuals.is_some() {
                return Err(Error::Invalid(
                    "ControlNet residuals cannot be added to a video UNet".into(),
                ));
            }
            return self.forward_video(sample, timesteps, context, None);
        }
        self.forward_frames(sample, timesteps, context, residuals, None, 1)
    }

    /// [`Self::forward_each`] with `added` `[b, 4 * c0]` summed into each row's time embedding
    /// (a video's to each of its frames): what a family conditions on besides the timestep
    /// and the text, such as VideoCrafter2's frame rate.
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        added: &Tensor,
    ) -> Result<Tensor> {
        check_inputs(&self.enc.cfg, sample, timesteps, context, "UNet")?;
        let want = (timesteps.len(), self.enc.cfg.block_out_channels[0] * 4);
        if added.dims2()? != want {
            return Err(Error::Invalid(format!(
                "an added time embedding of shape {:?}; this UNet takes {want:?}",
                added.dims()
            )));
        }
        if self.enc.cfg.video {
            return self.forward_video(sample, timesteps, context, Some(added));
        }
        self.forward_frames(sample, timesteps, context, None, Some(added), 1)
    }

    /// diffusers' `UNet3DConditionModel.forward`: the frames of `[b, c, f, h, w]` as a batch
    /// of `b * f` (each video's consecutive), every frame with its video's timestep and text.
    fn forward_video(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        added: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, f, h, w) = sample.dims5()?;
        let frames = sample
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((b * f, c, h, w))?;
        let per_frame: Vec<f64> = timesteps
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, f))
            .collect();
        let (_, l, d) = context.dims3()?;
        let ctx = context
            .unsqueeze(1)?
            .broadcast_as((b, f, l, d))?
            .reshape((b * f, l, d))?;
        // Each video's added embedding, repeated for its frames.
        let added = match added {
            Some(a) => {
                let d = a.dim(1)?;
                Some(
                    a.unsqueeze(1)?
                        .broadcast_as((b, f, d))?
                        .reshape((b * f, d))?,
                )
            }
            None => None,
        };
        let out = self.forward_frames(&frames, &per_frame, &ctx, None, added.as_ref(), f)?;
        let oc = out.dim(1)?;
        Ok(out
            .reshape((b, f, oc, h, w))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?)
    }

    /// The network on a batch of frames (`frames` = 1: images).
    fn forward_frames(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        residuals: Option<&Residuals>,
        added: Option<&Tensor>,
        frames: usize,
    ) -> Result<Tensor> {
        // The same text at every step: its keys and values are projected once (nn::context).
        let context = &crate::nn::context::stable(context)?;
        let temb = self.time_embedding_each(timesteps, sample.dtype(), sample.device())?;
        let temb = match added {
            Some(a) => (temb + a.to_dtype(sample.dtype())?)?,
            None => temb,
        };
        let xs = self.enc.forward_in(sample, frames)?;
        let (mut xs, mut skips) = self.enc.forward_down(&xs, &temb, context, frames)?;
        if let Some(r) = residuals {
            if r.down.len() != skips.len() {
                return Err(Error::Invalid(format!(
                    "a ControlNet gave {} residuals for this UNet's {} skip connections",
                    r.down.len(),
                    skips.len()
                )));
            }
            skips = skips
                .iter()
                .zip(&r.down)
                .map(|(s, r)| s.broadcast_add(&r.to_dtype(s.dtype())?))
                .collect::<candle_core::Result<_>>()?;
        }
        xs = self.enc.mid.forward(&xs, &temb, context, frames)?;
        if let Some(r) = residuals {
            xs = xs.broadcast_add(&r.mid.to_dtype(xs.dtype())?)?;
        }
        for block in &self.up {
            xs = block.forward_up(&xs, &mut skips, &temb, context, frames)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        // The noise prediction in the latents' dtype (f32 under autocast).
        Ok(self.conv_out.forward(&xs)?.to_dtype(sample.dtype())?)
    }
}

/// Sinusoidal timestep features (diffusers' `Timesteps`), `[b]` -> `[b, dim]`.
fn time_features(
    cfg: &UNetConfig,
    timesteps: &[f64],
    dtype: DType,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let dim = cfg.block_out_channels[0];
    sinusoid(
        timesteps,
        dim,
        cfg.flip_sin_to_cos,
        cfg.freq_shift,
        dtype,
        dev,
    )
}

/// diffusers' `get_timestep_embedding` (and lvdm's `timestep_embedding`, which is its
/// `flip_sin_to_cos`, shift 0 case) of any values: `[b]` -> `[b, dim]`, frequencies in f32.
pub fn sinusoid(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    dtype: DType,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    // diffusers computes the frequencies in f32; mirror that for parity.
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - shift as f32);
            exponent.exp()
        })
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &timestep in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| timestep as f32 * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), dev)?.to_dtype(dtype)
}
