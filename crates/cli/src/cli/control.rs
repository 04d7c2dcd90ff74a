//! `--controlnet`, `--control-image`, `--controlnet-scale`, `--guess-mode` and
//! `--control-preprocess`: ControlNets added to the pipeline with their conditioning images,
//! read in the formats users have and optionally turned into canny edges first.

use super::{lib, user};
use anyhow::Result;
use reneg::Pipeline;
use std::path::{Path, PathBuf};

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
    /// `key=value` lines for an evaluation's manifest.
    pub fn options(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .controlnet
            .iter()
            .map(|p| format!("controlnet={}", p.display()))
            .collect();
        if let Some(c) = &self.controlnet_config {
            v.push(format!("controlnet_config={}", c.display()));
        }
        v.extend(
            self.control_image
                .iter()
                .map(|p| format!("control_image={}", p.display())),
        );
        v.extend(
            self.controlnet_scale
                .iter()
                .map(|s| format!("controlnet_scale={s}")),
        );
        if self.guess_mode {
            v.push("guess_mode=true".into());
        }
        if let Some(p) = self.control_preprocess {
            v.push(format!("control_preprocess={p:?}"));
            v.push(format!("canny_thresholds={:?}", self.canny_thresholds));
        }
        v
    }

    /// The ControlNets, their config folder and the control images, by role (for an
    /// evaluation's manifest).
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut v: Vec<(&'static str, PathBuf)> = self
            .controlnet
            .iter()
            .map(|p| ("controlnet", p.clone()))
            .collect();
        v.extend(
            self.controlnet_config
                .iter()
                .map(|p| ("controlnet config", p.clone())),
        );
        v.extend(
            self.control_image
                .iter()
                .map(|p| ("control image", p.clone())),
        );
        v
    }
}

/// An image file as 8-bit RGB, optionally preprocessed: (pixels HWC, width, height).
pub fn read_image(
    path: &Path,
    pre: Option<Preprocess>,
    thresholds: &[f32],
) -> Result<(Vec<u8>, usize, usize)> {
    reneg::control::read_image(path, pre, thresholds).map_err(lib)
}

/// Each ControlNet's image and scale: (the images given, which of them each ControlNet takes,
/// the scales). One value of a flag is for all; otherwise one each.
fn images_and_scales(
    a: &ControlArgs,
    fallback: Option<&Path>,
) -> Result<(Vec<PathBuf>, Vec<usize>, Vec<f64>)> {
    let n = a.controlnet.len();
    let pick = |len: usize, flag: &str| -> Result<Vec<usize>> {
        match len {
            1 => Ok(vec![0; n]),
            l if l == n => Ok((0..n).collect()),
            l => Err(user(format!(
                "{l} {flag} for {n} --controlnet: give one for all or one each"
            ))),
        }
    };
    let given: Vec<PathBuf> = match (a.control_image.is_empty(), fallback) {
        (false, _) => a.control_image.clone(),
        (true, Some(f)) => vec![f.to_path_buf()],
        (true, None) => return Err(user("--controlnet needs a --control-image")),
    };
    let images = pick(given.len(), "--control-image")?;
    let scales = if a.controlnet_scale.is_empty() {
        vec![1.0; n]
    } else {
        pick(a.controlnet_scale.len(), "--controlnet-scale")?
            .into_iter()
            .map(|i| a.controlnet_scale[i])
            .collect()
    };
    if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
        return Err(user(format!("--controlnet-scale {s}: must be a number")));
    }
    Ok((given, images, scales))
}

/// Loads each ControlNet with its image and scale into `sd`; returns the control images' size
/// (width, height) in pixels, None without ControlNets. `fallback` is the image used when no
/// --control-image is given (eval's per-prompt images replace it prompt by prompt).
pub fn apply(
    sd: &mut Pipeline,
    a: &ControlArgs,
    fallback: Option<&Path>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Option<(usize, usize)>> {
    let n = a.controlnet.len();
    if n == 0 {
        if !a.control_image.is_empty() || !a.controlnet_scale.is_empty() || a.guess_mode {
            return Err(user(
                "--control-image, --controlnet-scale and --guess-mode need a --controlnet",
            ));
        }
        return Ok(None);
    }
    let (given, images, scales) = images_and_scales(a, fallback)?;
    let mut size = None;
    for (k, path) in a.controlnet.iter().enumerate() {
        let model = reneg::control::load(path, a.controlnet_config.as_deref(), dtype, device)
            .map_err(lib)?;
        let file = &given[images[k]];
        let (rgb, w, h) = read_image(file, a.control_preprocess, &a.canny_thresholds)?;
        match size {
            None => size = Some((w, h)),
            Some((w0, h0)) if (w0, h0) != (w, h) => {
                return Err(user(format!(
                    "--control-image {}: {w}x{h}, but the first control image is {w0}x{h0}; give images of one size",
                    file.display()
                )))
            }
            _ => {}
        }
        let image = reneg::control::image_tensor(&rgb, w, h, device)
            .map_err(lib)?
            .to_dtype(sd.dtype())?;
        sd.add_controlnet(model, image, scales[k], path)
            .map_err(lib)?;
    }
    sd.set_guess_mode(a.guess_mode).map_err(lib)?;
    println!(
        "controlnet: {} ({}x{} control image{})",
        a.controlnet
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        size.map_or(0, |s| s.0),
        size.map_or(0, |s| s.1),
        if a.guess_mode { ", guess mode" } else { "" }
    );
    Ok(size)
}

/// The output size with ControlNets: the control images' unless --height/--width say
/// otherwise, in which case they must agree (reneg does not resize control images).
pub fn check_size(
    control: Option<(usize, usize)>,
    height: Option<usize>,
    width: Option<usize>,
) -> Result<(Option<usize>, Option<usize>)> {
    let Some((w, h)) = control else {
        return Ok((height, width));
    };
    if height.is_some_and(|x| x != h) || width.is_some_and(|x| x != w) {
        return Err(user(format!(
            "--control-image is {w}x{h} but --width/--height ask for {}x{}: resize the control image or leave the size out",
            width.unwrap_or(w),
            height.unwrap_or(h)
        )));
    }
    Ok((Some(h), Some(w)))
}

/// The prompts' own control images (eval's `control_image` column), read once each and
/// checked against the ControlNets and the output size before anything runs.
pub fn prompt_images(
    sd: &Pipeline,
    a: &ControlArgs,
    prompts: &[reneg::prompts::Prompt],
    size: Option<(usize, usize)>,
    device: &candle_core::Device,
) -> Result<std::collections::HashMap<PathBuf, candle_core::Tensor>> {
    let mut out = std::collections::HashMap::new();
    let listed: Vec<&PathBuf> = prompts
        .iter()
        .filter_map(|p| p.control_image.as_ref())
        .collect();
    if listed.is_empty() {
        return Ok(out);
    }
    if sd.controls().is_empty() {
        return Err(user(format!(
            "the prompt file gives control images ({} first); add the --controlnet they are for",
            listed[0].display()
        )));
    }
    if a.control_image.is_empty() && listed.len() != prompts.len() {
        return Err(user(
            "some prompts have no control image: give each one, or a --control-image for the rest",
        ));
    }
    for path in listed {
        if out.contains_key(path) {
            continue;
        }
        let (rgb, w, h) = read_image(path, a.control_preprocess, &a.canny_thresholds)?;
        if let Some((w0, h0)) = size {
            if (w, h) != (w0, h0) {
                return Err(user(format!(
                    "{}: {w}x{h}, but the control images are {w0}x{h0}; give images of one size",
                    path.display()
                )));
            }
        }
        let t = reneg::control::image_tensor(&rgb, w, h, device)
            .map_err(lib)?
            .to_dtype(sd.dtype())?;
        out.insert(path.clone(), t);
    }
    Ok(out)
}

/// Sets every ControlNet's image to the prompt's own, or back to `defaults` when it has none.
pub fn use_prompt_image(
    sd: &mut Pipeline,
    prompt: &reneg::prompts::Prompt,
    images: &std::collections::HashMap<PathBuf, candle_core::Tensor>,
    defaults: &[candle_core::Tensor],
) {
    for (k, c) in sd.controls_mut().iter_mut().enumerate() {
        c.image = match prompt.control_image.as_ref().and_then(|p| images.get(p)) {
            Some(t) => t.clone(),
            None => defaults[k].clone(),
        };
    }
}
