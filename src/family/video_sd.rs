//! diffusers' `TextToVideoSDPipeline` (ModelScope, ZeroScope): SD's CLIP encoder and VAE with a
//! `UNet3DConditionModel` (temporal convolutions and attention), whose latents carry a frames
//! axis, `[b, C, frames, h, w]`; the pipeline decodes them frame by frame. ControlNets are
//! refused by the denoiser (they are image models).

use super::{Family, Roles};
use crate::error::Result;
use candle_core::{DType, Device};
use std::path::Path;

/// A `TextToVideoSDPipeline` folder's roles; its `unet/config.json` must be the 3D UNet.
pub fn load_folder(
    root: &Path,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<Roles> {
    let (e, d, v) =
        super::sd::load_folder(root, dtype, device, loras, Some(Family::TextToVideoSd))?;
    Ok((Box::new(e), Box::new(d), Box::new(v)))
}
