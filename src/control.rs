//! ControlNets in the pipeline: loading diffusers `ControlNetModel` folders, and the
//! conditioning image each one sees. [`crate::Pipeline::add_controlnet`] checks that a
//! ControlNet fits the UNet; the guided step adds every ControlNet's residuals (diffusers'
//! `MultiControlNetModel` sums them), with the negative going through their cross-attention
//! as through the UNet's.

use crate::error::{Error, Result};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// One ControlNet with its conditioning image and scale.
pub struct Control {
    pub model: ControlNetModel,
    /// `[1, 3, H, W]` in [0, 1], RGB (ControlNet's image processor does not normalise to
    /// [-1, 1]).
    pub image: Tensor,
    /// diffusers' `controlnet_conditioning_scale`.
    pub scale: f64,
    pub source: PathBuf,
}

/// Loads a ControlNet: a diffusers `ControlNetModel` folder (`config.json` and
/// `diffusion_pytorch_model.safetensors`, or its fp16 variant), or a single file in the
/// original layout (`.safetensors`, or a pickled `.pth`/`.pt`/`.ckpt` state dict of plain
/// tensors, read without running any code). `config_dir`, a diffusers ControlNet folder or
/// its `config.json`, replaces the config inferred from a single file's tensors.
pub fn load(
    path: &Path,
    config_dir: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<ControlNetModel> {
    if path.is_file() {
        return load_single_file(path, config_dir, dtype, device);
    }
    if !path.is_dir() {
        return Err(Error::file(
            path,
            "no such ControlNet: give a diffusers ControlNetModel folder or a single .safetensors/.pth file",
        ));
    }
    let cfg = ControlNetConfig::load(&path.join("config.json"))?;
    let weights = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::file(
                path,
                "no diffusion_pytorch_model.safetensors; save the ControlNet with safe_serialization=True",
            )
        })?;
    ControlNetModel::new(cfg, &Vb::new(Weights::load(&weights, dtype, device)?))
}

/// Pixels `[H, W, 3]` (u8, RGB) as a `[1, 3, H, W]` tensor in [0, 1].
pub fn image_tensor(rgb: &[u8], width: usize, height: usize, device: &Device) -> Result<Tensor> {
    if rgb.len() != width * height * 3 {
        return Err(Error::Invalid(format!(
            "control image: {} bytes for {width}x{height} RGB",
            rgb.len()
        )));
    }
    let data: Vec<f32> = rgb.iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

fn load_single_file(
    path: &Path,
    config_dir: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<ControlNetModel> {
    let bytes = crate::io::map_file(path)?;
    let tensors = if crate::torch_file::is_zip(&bytes)
        || !path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        crate::torch_file::read_state_dict(&bytes, path)?
    } else {
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file ({e})")))?
    };
    let (converted, inferred) = crate::single_file::convert_controlnet(&tensors, path)?;
    let cfg = match config_dir {
        Some(d) => {
            let file = if d.is_dir() {
                d.join("config.json")
            } else {
                d.to_path_buf()
            };
            ControlNetConfig::load(&file)?
        }
        None => ControlNetConfig::from_value(inferred, path)?,
    };
    ControlNetModel::new(
        cfg,
        &Vb::new(Weights::from_tensors(converted, path, dtype, device)),
    )
}

/// How a control image is prepared before the ControlNet sees it.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Preprocess {
    /// Canny edges (white on black), as ControlNet's canny models were trained on.
    Canny,
}

/// An image file (PNG, JPEG, WebP) as 8-bit RGB, optionally preprocessed (`thresholds`: canny's
/// low and high): (pixels HWC, width, height).
pub fn read_image(
    path: &Path,
    pre: Option<Preprocess>,
    thresholds: &[f32],
) -> Result<(Vec<u8>, usize, usize)> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::file(path, format!("cannot open the control image: {e}")))?
        .decode()
        .map_err(|e| {
            Error::file(
                path,
                format!("not an image reneg can read ({e}); give a PNG, JPEG or WebP"),
            )
        })?;
    let rgb = match pre {
        None => img.to_rgb8(),
        Some(Preprocess::Canny) => {
            let (low, high) = match thresholds {
                [low, high] => (*low, *high),
                _ => {
                    return Err(Error::Invalid(
                        "canny needs two thresholds, LOW HIGH".into(),
                    ))
                }
            };
            if !(low >= 0.0 && high >= low) {
                return Err(Error::Invalid(format!(
                    "--canny-thresholds {low} {high}: need 0 <= LOW <= HIGH"
                )));
            }
            let edges = imageproc::edges::canny(&img.to_luma8(), low, high);
            image::DynamicImage::ImageLuma8(edges).to_rgb8()
        }
    };
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok((rgb.into_raw(), w, h))
}
