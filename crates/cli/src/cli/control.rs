//! `--controlnet`, `--control-image`, `--controlnet-scale`, `--guess-mode` and
//! `--control-preprocess`: ControlNets added to the pipeline with their conditioning images,
//! read in the formats users have and optionally turned into canny edges first.

use super::lib;
use anyhow::Result;
use reneg::Pipeline;
use std::path::PathBuf;

pub use reneg::control::Preprocess;

#[derive(clap::Args, Clone, Default)]
pub struct ControlArgs {
    /// A ControlNet: a diffusers ControlNetModel folder (config.json and
    /// diffusion_pytorch_model.safetensors), or a single file in the original layout
    /// (lllyasviel's .pth, or .safetensors with control_model.* keys). Repeat for several
    /// (their residuals add up, as diffusers' MultiControlNetModel does), each with its
    /// --control-image.
    #[arg(long)]
    pub controlnet: Vec<PathBuf>,
    /// For single-file ControlNets: a diffusers ControlNet folder (or config.json) whose config
    /// replaces the one inferred from the tensors.
    #[arg(long)]
    pub controlnet_config: Option<PathBuf>,
    /// The conditioning image (PNG, JPEG or WebP) of each --controlnet, in the same order, or one
    /// for all. It sets the output size unless --height/--width are given, which must then match.
    #[arg(long)]
    pub control_image: Vec<PathBuf>,
    /// diffusers' controlnet_conditioning_scale: one for all ControlNets or one each
    /// [default: 1].
    #[arg(long)]
    pub controlnet_scale: Vec<f64>,
    /// Guess mode: the ControlNets act on the prompt's branch of guidance only, their residuals
    /// ramped from 0.1 (shallowest) to 1 (mid block); diffusers suggests guidance 3-5 with it.
    #[arg(long)]
    pub guess_mode: bool,
    /// Turn each control image into canny edges first (for a photo given to an edge ControlNet).
    #[arg(long, value_enum)]
    pub control_preprocess: Option<Preprocess>,
    /// The canny preprocessor's low and high thresholds (gradient magnitudes, 0-1140).
    #[arg(long, num_args = 2, value_names = ["LOW", "HIGH"], default_values_t = [100.0f32, 200.0])]
    pub canny_thresholds: Vec<f32>,
}

impl ControlArgs {
    /// The flags as the library's ControlNet plan.
    pub fn plan(&self) -> reneg::run::control::ControlPlan {
        reneg::run::control::ControlPlan {
            controlnets: self.controlnet.clone(),
            config: self.controlnet_config.clone(),
            images: self.control_image.clone(),
            scales: self.controlnet_scale.clone(),
            guess_mode: self.guess_mode,
            preprocess: self.control_preprocess,
            canny_thresholds: self.canny_thresholds.clone(),
        }
    }
}

/// Loads each ControlNet with its image and scale into `sd` and says so; returns the control
/// images' size (width, height) in pixels, None without ControlNets.
pub fn apply(
    sd: &mut Pipeline,
    a: &ControlArgs,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Option<(usize, usize)>> {
    let plan = a.plan();
    let size = plan.apply(sd, None, dtype, device).map_err(lib)?;
    if let Some(line) = plan.summary(size) {
        println!("{line}");
    }
    Ok(size)
}

/// The output size with ControlNets: the control images' unless --height/--width say
/// otherwise, in which case they must agree (reneg does not resize control images).
pub fn check_size(
    control: Option<(usize, usize)>,
    height: Option<usize>,
    width: Option<usize>,
) -> Result<(Option<usize>, Option<usize>)> {
    reneg::run::control::check_size(control, height, width).map_err(lib)
}
