//! HPSv2 / HPSv2.1: an OpenCLIP ViT-H-14 fine-tuned on human preferences; the score is the
//! cosine of the normalised image and text features, reported x100 as the benchmark does.

use super::preprocess::Preprocess;
use super::{check_batch, l2_normalize, rowwise_dot, ImageEncoder, Reward};
use crate::error::Result;
use crate::models::open_clip::OpenClipModel;
use crate::tokenizer::ClipTokenizer;
use candle_core::Tensor;

pub struct HpsReward {
    pub model: OpenClipModel,
    /// open_clip's tokenizer: CLIP BPE, padded with id 0.
    pub tokenizer: ClipTokenizer,
    pub preprocess: Preprocess,
}

impl HpsReward {
    pub fn text_ids(&self, prompts: &[String], images: &Tensor) -> Result<Tensor> {
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

    /// The cosine similarity (HPS before x100) of preprocessed pixels and token ids.
    pub fn similarity(&self, pixels: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let img = l2_normalize(&self.model.visual.forward(pixels)?)?;
        let txt = l2_normalize(&self.model.text.forward(ids)?)?.to_dtype(img.dtype())?;
        rowwise_dot(&img, &txt)
    }
}

impl Reward for HpsReward {
    fn name(&self) -> &'static str {
        "hps"
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        check_batch(images, prompts, true)?;
        let pixels = self.preprocess.forward(images)?;
        let ids = self.text_ids(prompts, images)?;
        Ok((self.similarity(&pixels, &ids)? * 100.0)?)
    }

    fn image_encoder(&self) -> Option<&dyn ImageEncoder> {
        Some(self)
    }
}

impl ImageEncoder for HpsReward {
    fn image_features(&self, images: &Tensor) -> Result<Tensor> {
        check_batch(images, &[], false)?;
        l2_normalize(
            &self
                .model
                .visual
                .forward(&self.preprocess.forward(images)?)?,
        )
    }
}
