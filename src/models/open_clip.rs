//! OpenCLIP's `CLIP` (open-clip-torch 3.3.0) as HPSv2 ships it: a ViT image tower and a
//! causal text tower with `text_projection`, loaded from an open_clip state dict with its own
//! key names and an `open_clip_config.json` (`embed_dim`, `quick_gelu`, `vision_cfg`,
//! `text_cfg`).

use crate::error::{read_json, Error, Result};
use crate::models::clip_layers::ClipEncoderLayer;
use crate::models::clip_text::causal_mask;
use crate::models::clip_vision::VisionTower;
use crate::models::config::require_defaults;
use crate::nn::{Activation, LayerNorm};
use crate::weights::Vb;
use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct VisionCfg {
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_vlayers")]
    pub layers: usize,
    #[serde(default = "d_vwidth")]
    pub width: usize,
    #[serde(default = "d_head_width")]
    pub head_width: usize,
    #[serde(default = "d_mlp")]
    pub mlp_ratio: f64,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextCfg {
    #[serde(default = "d_ctx")]
    pub context_length: usize,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_twidth")]
    pub width: usize,
    #[serde(default = "d_theads")]
    pub heads: usize,
    #[serde(default = "d_tlayers")]
    pub layers: usize,
    #[serde(default = "d_mlp")]
    pub mlp_ratio: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipConfig {
    pub embed_dim: usize,
    #[serde(default)]
    pub quick_gelu: bool,
    pub vision_cfg: VisionCfg,
    pub text_cfg: TextCfg,
}

fn d_image() -> usize {
    224
}
fn d_vlayers() -> usize {
    12
}
fn d_vwidth() -> usize {
    768
}
fn d_head_width() -> usize {
    64
}
fn d_mlp() -> f64 {
    4.0
}
fn d_patch() -> usize {
    16
}
fn d_ctx() -> usize {
    77
}
fn d_vocab() -> usize {
    49408
}
fn d_twidth() -> usize {
    512
}
fn d_theads() -> usize {
    8
}
fn d_tlayers() -> usize {
    12
}

/// OpenCLIP ViT-H-14, the HPSv2 / HPSv2.1 architecture (the project's copy of open_clip's
/// model config; GELU, not QuickGELU).
pub const VIT_H_14: &str = include_str!("../../assets/model-configs/openclip-ViT-H-14.json");

impl OpenClipConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_value(read_json(path)?, path)
    }

    pub fn from_value(v: Value, path: &Path) -> Result<Self> {
        // open_clip options that change the computation, accepted only at their defaults.
        let empty = serde_json::Map::new();
        let vision = v
            .get("vision_cfg")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        require_defaults(
            vision,
            path,
            &[
                ("ls_init_value", json!(null)),
                ("patch_dropout", json!(0.0)),
                ("attentional_pool", json!(false)),
                ("no_ln_pre", json!(false)),
                ("final_ln_after_pool", json!(false)),
                ("pool_type", json!("tok")),
                ("output_tokens", json!(false)),
                ("timm_model_name", json!(null)),
            ],
        )?;
        let text = v
            .get("text_cfg")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        require_defaults(
            text,
            path,
            &[
                ("ls_init_value", json!(null)),
                ("embed_cls", json!(false)),
                ("pool_type", json!("argmax")),
                ("proj_bias", json!(false)),
                ("no_causal_mask", json!(false)),
                ("hf_model_name", json!(null)),
            ],
        )?;
        let cfg: Self = serde_json::from_value(v)
            .map_err(|e| Error::file(path, format!("invalid open_clip config: {e}")))?;
        if cfg.vision_cfg.head_width == 0
            || !cfg
                .vision_cfg
                .width
                .is_multiple_of(cfg.vision_cfg.head_width)
        {
            return Err(Error::unsupported(
                path,
                "vision_cfg.head_width",
                cfg.vision_cfg.head_width,
                "must divide vision_cfg.width",
            ));
        }
        if cfg.text_cfg.heads == 0 || !cfg.text_cfg.width.is_multiple_of(cfg.text_cfg.heads) {
            return Err(Error::unsupported(
                path,
                "text_cfg.heads",
                cfg.text_cfg.heads,
                "must divide text_cfg.width",
            ));
        }
        if cfg.vision_cfg.patch_size == 0
            || !cfg
                .vision_cfg
                .image_size
                .is_multiple_of(cfg.vision_cfg.patch_size)
        {
            return Err(Error::unsupported(
                path,
                "vision_cfg.patch_size",
                cfg.vision_cfg.patch_size,
                "must divide image_size",
            ));
        }
        Ok(cfg)
    }

    fn act(&self) -> Activation {
        if self.quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        }
    }
}

pub struct OpenClipText {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    ln_final: LayerNorm,
    /// `[embed_dim, width]` (stored transposed in the state dict).
    projection: Tensor,
    heads: usize,
    act: Activation,
    vocab: usize,
}

impl OpenClipText {
    /// Text features (not normalised).
    ///
    /// # Shapes
    /// `ids`: `[b, context_length]` -> `[b, embed_dim]`
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let rows = ids_u32.to_vec2::<u32>()?;
        if let Some(&bad) = rows.iter().flatten().find(|&&v| v as usize >= self.vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the text tower's vocabulary ({})",
                self.vocab
            )));
        }
        let width = self.token_embedding.dim(1)?;
        let mut xs = self
            .token_embedding
            .index_select(&ids_u32.flatten_all()?, 0)?
            .reshape((b, n, width))?
            .broadcast_add(&self.positional_embedding.narrow(0, 0, n)?)?;
        let mask = causal_mask(n, xs.dtype(), xs.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask), self.heads, self.act)?;
        }
        let xs = self.ln_final.forward(&xs)?;
        // Pool at the end-of-text token: the highest id in each row (open_clip's argmax).
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let max = row.iter().copied().max().unwrap_or(0);
                let pos = row.iter().position(|&v| v == max).unwrap_or(0);
                xs.get(i)?.get(pos)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pooled, 0)?.matmul(&self.projection.t()?)?)
    }
}

/// OpenCLIP `CLIP`: image and text towers projecting into one embedding space.
pub struct OpenClipModel {
    pub visual: VisionTower,
    pub text: OpenClipText,
    pub cfg: OpenClipConfig,
}

impl OpenClipModel {
    /// `vb` points at the state dict's root (keys `visual.*`, `token_embedding.weight`, ...).
    pub fn new(cfg: OpenClipConfig, vb: &Vb) -> Result<Self> {
        let v = &cfg.vision_cfg;
        let t = &cfg.text_cfg;
        let act = cfg.act();
        let visual = VisionTower::from_open_clip(
            v.width,
            v.layers,
            v.width / v.head_width,
            (v.width as f64 * v.mlp_ratio) as usize,
            v.patch_size,
            v.image_size,
            cfg.embed_dim,
            act,
            &vb.pp("visual"),
        )?;
        let tmlp = (t.width as f64 * t.mlp_ratio) as usize;
        let layers = (0..t.layers)
            .map(|i| {
                ClipEncoderLayer::from_open_clip(
                    t.width,
                    tmlp,
                    &vb.pp("transformer.resblocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let text = OpenClipText {
            token_embedding: vb
                .pp("token_embedding")
                .get(&[t.vocab_size, t.width], "weight")?,
            positional_embedding: vb.get(&[t.context_length, t.width], "positional_embedding")?,
            layers,
            ln_final: LayerNorm::new(t.width, 1e-5, &vb.pp("ln_final"))?,
            projection: vb
                .get(&[t.width, cfg.embed_dim], "text_projection")?
                .t()?
                .contiguous()?,
            heads: t.heads,
            act,
            vocab: t.vocab_size,
        };
        Ok(Self { visual, text, cfg })
    }
}
