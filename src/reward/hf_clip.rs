//! transformers' `CLIPModel` (PickScore's layout): text and vision towers with their
//! projections and `logit_scale`. PickScore = exp(logit_scale) * cosine; CLIP score =
//! 100 * max(cosine, 0).

use super::preprocess::Preprocess;
use super::{check_batch, l2_normalize, rowwise_dot, ImageEncoder, Reward};
use crate::error::{read_json, Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::clip_vision::{ClipVisionConfig, VisionTower};
use crate::nn::Linear;
use crate::tokenizer::ClipTokenizer;
use crate::weights::Vb;
use candle_core::{DType, Tensor};
use std::path::Path;

pub struct HfClipModel {
    pub text: ClipTextModel,
    pub text_projection: Linear,
    pub vision: VisionTower,
    pub logit_scale: f64,
}

impl HfClipModel {
    /// From a `CLIPConfig` config.json and the model's state dict.
    pub fn new(config_path: &Path, vb: &Vb) -> Result<Self> {
        let v: serde_json::Value = read_json(config_path)?;
        let (Some(tc), Some(vc)) = (v.get("text_config"), v.get("vision_config")) else {
            return Err(Error::file(
                config_path,
                "not a transformers CLIPModel config (needs text_config and vision_config)",
            ));
        };
        let projection_dim = v
            .get("projection_dim")
            .and_then(|p| p.as_u64())
            .unwrap_or(512) as usize;
        let text_cfg = ClipTextConfig::from_value(tc.clone(), config_path)?;
        let mut vision_cfg = ClipVisionConfig::from_value(vc.clone(), config_path)?;
        vision_cfg.projection_dim = Some(projection_dim);
        let hidden = text_cfg.hidden_size;
        Ok(Self {
            text: ClipTextModel::new(text_cfg, vb)?,
            text_projection: Linear::new(hidden, projection_dim, false, &vb.pp("text_projection"))?,
            vision: VisionTower::new(
                &vision_cfg,
                &vb.pp("vision_model"),
                Some(&vb.pp("visual_projection")),
            )?,
            logit_scale: vb
                .get(&[], "logit_scale")?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        })
    }

    /// Normalised image embeddings of preprocessed pixels, `[n, d]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.vision.forward(pixels)?)
    }

    /// Normalised text embeddings, `[n, d]`.
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text.forward(ids)?;
        let pooled = self.text.pooled(&hidden, ids)?;
        l2_normalize(&self.text_projection.forward(&pooled)?)
    }
}

/// How a CLIPModel's cosine becomes a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipScoring {
    /// exp(logit_scale) x cosine.
    PickScore,
    /// 100 x max(cosine, 0).
    ClipScore,
}

pub struct HfClipReward {
    pub model: HfClipModel,
    pub tokenizer: ClipTokenizer,
    pub preprocess: Preprocess,
    pub scoring: ClipScoring,
}

impl HfClipReward {
    fn ids(&self, prompts: &[String], images: &Tensor) -> Result<Tensor> {
        let rows: Vec<u32> = prompts
            .iter()
            .flat_map(|p| self.tokenizer.encode(p))
            .collect();
        Ok(Tensor::from_vec(
            rows,
            (prompts.len(), self.tokenizer.max_len()),
            images.device(),
        )?)
    }
}

impl Reward for HfClipReward {
    fn name(&self) -> &'static str {
        match self.scoring {
            ClipScoring::PickScore => "pickscore",
            ClipScoring::ClipScore => "clip",
        }
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        check_batch(images, prompts, true)?;
        let img = self.model.image_embeds(&self.preprocess.forward(images)?)?;
        let txt = self
            .model
            .text_embeds(&self.ids(prompts, images)?)?
            .to_dtype(img.dtype())?;
        let cos = rowwise_dot(&img, &txt)?;
        Ok(match self.scoring {
            ClipScoring::PickScore => (cos * self.model.logit_scale.exp())?,
            ClipScoring::ClipScore => (cos.relu()? * 100.0)?,
        })
    }

    fn image_encoder(&self) -> Option<&dyn ImageEncoder> {
        Some(self)
    }
}

impl ImageEncoder for HfClipReward {
    fn image_features(&self, images: &Tensor) -> Result<Tensor> {
        check_batch(images, &[], false)?;
        self.model.image_embeds(&self.preprocess.forward(images)?)
    }
}
