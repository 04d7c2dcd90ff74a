//! transformers' `CLIPVisionTransformer` (transformers 5.23): patch embedding, class token,
//! position embeddings, `pre_layrnorm`, encoder, `post_layernorm` on the class token. With
//! `visual_projection` it is `CLIPVisionModelWithProjection`'s `image_embeds`.

use crate::error::{read_json, Result};
use crate::models::clip_layers::ClipEncoderLayer;
use crate::nn::{Activation, LayerNorm, Linear};
use crate::weights::Vb;
use candle_core::Tensor;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_channels() -> usize {
    3
}
fn d_act() -> Activation {
    Activation::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}

impl ClipVisionConfig {
    /// From a `CLIPVisionConfig` config.json, or the `vision_config` of a `CLIPConfig`.
    pub fn load(path: &Path) -> Result<Self> {
        let v: serde_json::Value = read_json(path)?;
        Self::from_value(v.get("vision_config").cloned().unwrap_or(v), path)
    }

    pub fn from_value(v: serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(v)
            .map_err(|e| crate::Error::file(path, format!("invalid vision config: {e}")))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(crate::Error::unsupported(
                path,
                "num_attention_heads",
                cfg.num_attention_heads,
                "must divide hidden_size",
            ));
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(crate::Error::unsupported(
                path,
                "patch_size",
                cfg.patch_size,
                "must divide image_size",
            ));
        }
        Ok(cfg)
    }
}

/// A ViT image tower shared by the transformers and OpenCLIP layouts: patchify, class token,
/// positions, pre-norm, encoder, post-norm of the class token, optional projection.
pub struct VisionTower {
    patch_weight: Tensor,
    class_embedding: Tensor,
    positions: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_norm: LayerNorm,
    projection: Option<Linear>,
    heads: usize,
    patch: usize,
    image_size: usize,
    act: Activation,
}

impl VisionTower {
    /// transformers' `vision_model.*` keys; `projection`: `visual_projection` (no bias).
    pub fn new(cfg: &ClipVisionConfig, vb: &Vb, projection: Option<&Vb>) -> Result<Self> {
        let h = cfg.hidden_size;
        let grid = cfg.image_size / cfg.patch_size;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(
                    h,
                    cfg.intermediate_size,
                    cfg.layer_norm_eps,
                    &vb.pp("encoder.layers").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let projection = match (projection, cfg.projection_dim) {
            (Some(p), Some(d)) => Some(Linear::new(h, d, false, p)?),
            (Some(_), None) => {
                return Err(crate::Error::Invalid(
                    "vision config lacks projection_dim for visual_projection".into(),
                ))
            }
            (None, _) => None,
        };
        Ok(Self {
            patch_weight: emb.pp("patch_embedding").get(
                &[h, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                "weight",
            )?,
            class_embedding: emb.get(&[h], "class_embedding")?,
            positions: emb
                .pp("position_embedding")
                .get(&[grid * grid + 1, h], "weight")?,
            pre_norm: LayerNorm::new(h, cfg.layer_norm_eps, &vb.pp("pre_layrnorm"))?,
            layers,
            post_norm: LayerNorm::new(h, cfg.layer_norm_eps, &vb.pp("post_layernorm"))?,
            projection,
            heads: cfg.num_attention_heads,
            patch: cfg.patch_size,
            image_size: cfg.image_size,
            act: cfg.hidden_act,
        })
    }

    /// OpenCLIP's `visual.*` keys (`conv1`, `class_embedding`, `positional_embedding`,
    /// `ln_pre`, `transformer.resblocks`, `ln_post`, `proj`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_open_clip(
        width: usize,
        layers: usize,
        heads: usize,
        mlp_width: usize,
        patch: usize,
        image_size: usize,
        embed_dim: usize,
        act: Activation,
        vb: &Vb,
    ) -> Result<Self> {
        let grid = image_size / patch;
        let blocks = (0..layers)
            .map(|i| {
                ClipEncoderLayer::from_open_clip(
                    width,
                    mlp_width,
                    &vb.pp("transformer.resblocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // OpenCLIP stores the projection as [width, embed_dim] for x @ proj.
        let proj = vb.get(&[width, embed_dim], "proj")?.t()?.contiguous()?;
        Ok(Self {
            patch_weight: vb.pp("conv1").get(&[width, 3, patch, patch], "weight")?,
            class_embedding: vb.get(&[width], "class_embedding")?,
            positions: vb.get(&[grid * grid + 1, width], "positional_embedding")?,
            pre_norm: LayerNorm::new(width, 1e-5, &vb.pp("ln_pre"))?,
            layers: blocks,
            post_norm: LayerNorm::new(width, 1e-5, &vb.pp("ln_post"))?,
            projection: Some(Linear::from_tensors(proj, None)),
            heads,
            patch,
            image_size,
            act,
        })
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Pooled (and projected, when the tower has a projection) image features.
    ///
    /// # Shapes
    /// `pixels`: `[b, 3, S, S]`, already normalised -> `[b, embed_dim]` (or `[b, hidden]`)
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        if h != self.image_size || w != self.image_size {
            return Err(crate::Error::Invalid(format!(
                "vision tower takes {0}x{0} images, got {h}x{w}; preprocess first",
                self.image_size
            )));
        }
        let pixels = pixels.to_dtype(self.patch_weight.dtype())?;
        let patches = pixels.conv2d(&self.patch_weight, 0, self.patch, 1, 1)?;
        let width = patches.dim(1)?;
        let tokens = patches.flatten_from(2)?.transpose(1, 2)?; // [b, grid², width]
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let xs = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.positions)?;
        let mut xs = self.pre_norm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None, self.heads, self.act)?;
        }
        let pooled = self.post_norm.forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        })
    }
}
