//! Model families: which one a diffusers folder or an original single file holds, recognised
//! from the owners' files as diffusers recognises them (the pipeline class `_class_name` in
//! `model_index.json`; the key layout of a single file), and refused by name when reneg does
//! not run it, before any weight is read; and the one place that maps a family to the module
//! that builds its roles ([`roles`]: prompt encoder, denoiser, decoder) from those files.
//!
//! Adding a family: a variant here with its pipeline classes, a module beside `sd.rs` that
//! loads its roles, and one arm in [`Family::load_folder`] (docs/ARCHITECTURE.md's checklist).

pub mod clip_prompt;
pub mod pixart;
pub mod roles;
pub mod sd;
pub mod sdxl;
pub mod video_sd;
pub mod videocrafter;

use crate::error::{read_json, Error, Result};
use candle_core::{DType, Device};
use roles::{Decoder, Denoiser, PromptEncoder};
use std::path::Path;

/// A family's three roles, as loaded.
pub type Roles = (Box<dyn PromptEncoder>, Box<dyn Denoiser>, Box<dyn Decoder>);

/// A family reneg runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x / 2.x: CLIP text encoder, `UNet2DConditionModel`, `AutoencoderKL`.
    StableDiffusion,
    /// diffusers' `TextToVideoSDPipeline` (ModelScope, ZeroScope): a `UNet3DConditionModel`.
    TextToVideoSd,
    /// Stable Diffusion XL: two CLIP encoders, a pooled embedding, size conditioning.
    Sdxl,
    /// PixArt-α: T5's encoder and an attention mask, a diffusion transformer.
    PixArt,
}

/// The pipeline classes of `model_index.json` that each family reads. The ControlNet and
/// img2img pipelines save the same components as `StableDiffusionPipeline` (a ControlNet
/// folder's `controlnet/` is read by `--controlnet`).
const PIPELINES: [(&str, Family); 6] = [
    ("StableDiffusionPipeline", Family::StableDiffusion),
    ("StableDiffusionControlNetPipeline", Family::StableDiffusion),
    ("StableDiffusionImg2ImgPipeline", Family::StableDiffusion),
    ("TextToVideoSDPipeline", Family::TextToVideoSd),
    ("StableDiffusionXLPipeline", Family::Sdxl),
    ("PixArtAlphaPipeline", Family::PixArt),
];

/// Single-file layouts reneg recognises but does not run: (a key prefix only that layout has,
/// its name).
const OTHER_SINGLE_FILES: [(&str, &str); 2] = [
    (
        "model.diffusion_model.x_embedder.",
        "a diffusion-transformer checkpoint (PixArt layout: x_embedder, t_embedder)",
    ),
    (
        "model.diffusion_model.double_blocks.",
        "a Flux checkpoint (double_blocks)",
    ),
];

impl Family {
    /// What the family is, for messages.
    pub fn label(self) -> &'static str {
        match self {
            Family::StableDiffusion => "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)",
            Family::TextToVideoSd => "text-to-video (TextToVideoSDPipeline: ModelScope, ZeroScope)",
            Family::Sdxl => "Stable Diffusion XL (StableDiffusionXLPipeline)",
            Family::PixArt => "PixArt-α (PixArtAlphaPipeline)",
        }
    }

    /// The family of a diffusers pipeline folder, from `model_index.json`'s `_class_name`;
    /// `None` when the file names no class (a hand-made folder: the UNet's class decides).
    /// A class reneg does not run is refused, naming it and the classes it runs.
    pub fn of_folder(root: &Path) -> Result<Option<Family>> {
        let index = root.join("model_index.json");
        let value: serde_json::Value = read_json(&index)?;
        let Some(class) = value.get("_class_name").and_then(|c| c.as_str()) else {
            return Ok(None);
        };
        match PIPELINES.iter().find(|(name, _)| *name == class) {
            Some((_, family)) => Ok(Some(*family)),
            None => Err(Error::file(
                &index,
                format!(
                    "names the pipeline {class}, a model family reneg does not run; it runs {}",
                    PIPELINES
                        .iter()
                        .map(|(name, _)| *name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Loads a diffusers folder of this family (`None`: a folder whose `model_index.json`
    /// names no class, read as SD with whichever UNet it has), LoRAs merged.
    pub fn load_folder(
        family: Option<Family>,
        root: &Path,
        dtype: DType,
        device: &Device,
        loras: &[crate::lora::Lora],
    ) -> Result<Roles> {
        match family {
            Some(Family::TextToVideoSd) => video_sd::load_folder(root, dtype, device, loras),
            Some(Family::Sdxl) => sdxl::load_folder(root, dtype, device, loras),
            Some(Family::PixArt) => pixart::load_folder(root, dtype, device, loras),
            Some(Family::StableDiffusion) | None => {
                let (e, d, v) = sd::load_folder(root, dtype, device, loras, family)?;
                Ok((Box::new(e), Box::new(d), Box::new(v)))
            }
        }
    }

    /// Checks that the family a folder names has the UNet it loaded (`video`: a
    /// `UNet3DConditionModel`), naming the folder when they disagree.
    pub fn check_unet(self, root: &Path, video: bool) -> Result<()> {
        let wants_video = self == Family::TextToVideoSd;
        if wants_video == video {
            return Ok(());
        }
        Err(Error::file(
            root.join("model_index.json"),
            format!(
                "names a {} pipeline, but unet/config.json is a {}",
                self.label(),
                if video {
                    "UNet3DConditionModel (a video model)"
                } else {
                    "UNet2DConditionModel (an image model)"
                }
            ),
        ))
    }

    /// For a single file that is not an SD 1.x/2.x checkpoint: which other layout its keys
    /// are, if reneg recognises it.
    pub fn other_single_file<'a>(
        keys: impl IntoIterator<Item = &'a String>,
    ) -> Option<&'static str> {
        let keys: Vec<&String> = keys.into_iter().collect();
        OTHER_SINGLE_FILES
            .iter()
            .find(|(prefix, _)| keys.iter().any(|k| k.starts_with(prefix)))
            .map(|(_, name)| *name)
    }
}
