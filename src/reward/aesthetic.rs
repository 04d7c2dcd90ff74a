//! LAION aesthetic predictor v2 ("improved aesthetic predictor"): the L2-normalised CLIP
//! ViT-L/14 image embedding through an MLP of linear layers (768-1024-128-64-16-1 with
//! dropout between, no activations), keys `layers.{0,2,4,6,7}`.

use super::preprocess::Preprocess;
use super::{check_batch, l2_normalize, ImageEncoder, Reward};
use crate::error::{Error, Result};
use crate::models::clip_vision::VisionTower;
use crate::nn::Linear;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The real head's weights (Apache-2.0, see assets/aesthetic-v2/LICENSE).
pub const LAION_HEAD: &[u8] =
    include_bytes!("../../assets/aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth");

/// A chain of linear layers named `layers.N`, applied in index order.
pub struct AestheticHead {
    layers: Vec<Linear>,
}

impl AestheticHead {
    /// From a state dict with `layers.N.weight` / `layers.N.bias`.
    pub fn from_tensors(
        t: &HashMap<String, Tensor>,
        source: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut idx: Vec<usize> = t
            .keys()
            .filter_map(|k| {
                k.strip_prefix("layers.")?
                    .strip_suffix(".weight")?
                    .parse()
                    .ok()
            })
            .collect();
        idx.sort_unstable();
        if idx.is_empty() {
            return Err(Error::file(
                source,
                "not an aesthetic head: no layers.N.weight tensors",
            ));
        }
        let mut layers = vec![];
        let mut width: Option<usize> = None;
        for i in idx {
            let w = &t[&format!("layers.{i}.weight")];
            let b = t
                .get(&format!("layers.{i}.bias"))
                .ok_or_else(|| Error::Weight {
                    file: source.to_path_buf(),
                    name: format!("layers.{i}.bias"),
                    problem: "is missing".into(),
                })?;
            let (out, inp) = w.dims2()?;
            if width.is_some_and(|wd| wd != inp) || b.dims() != [out] {
                return Err(Error::file(
                    source,
                    format!("aesthetic head layer {i} has inconsistent shapes"),
                ));
            }
            width = Some(out);
            layers.push(Linear::from_tensors(
                w.to_dtype(dtype)?.to_device(device)?,
                Some(b.to_dtype(dtype)?.to_device(device)?),
            ));
        }
        if width != Some(1) {
            return Err(Error::file(source, "aesthetic head must end in one output"));
        }
        Ok(Self { layers })
    }

    /// The real LAION head shipped with the library.
    pub fn laion(dtype: DType, device: &Device) -> Result<Self> {
        let path = Path::new("<embedded LAION aesthetic head>");
        let t = crate::torch_file::read_state_dict(LAION_HEAD, path)?;
        Self::from_tensors(&t, path, dtype, device)
    }

    pub fn input_dim(&self) -> usize {
        self.layers[0].in_dim()
    }

    /// # Shapes
    /// `[n, d]` -> `[n, 1]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(x)
    }
}

pub struct AestheticReward {
    pub vision: VisionTower,
    pub head: AestheticHead,
    pub preprocess: Preprocess,
}

impl AestheticReward {
    /// Normalised image embeddings of preprocessed pixels, `[n, d]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.vision.forward(pixels)?)
    }
}

impl Reward for AestheticReward {
    fn name(&self) -> &'static str {
        "aesthetic"
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        check_batch(images, prompts, false)?;
        let emb = self.image_embeds(&self.preprocess.forward(images)?)?;
        let score = self.head.forward(&emb)?.squeeze(1)?;
        Ok(score.to_dtype(emb.dtype())?)
    }

    fn image_encoder(&self) -> Option<&dyn ImageEncoder> {
        Some(self)
    }
}

impl ImageEncoder for AestheticReward {
    fn image_features(&self, images: &Tensor) -> Result<Tensor> {
        check_batch(images, &[], false)?;
        self.image_embeds(&self.preprocess.forward(images)?)
    }
}
