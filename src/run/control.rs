//! ControlNets as a run's plan sets them up: each with its conditioning image (read in the
//! formats users have, optionally turned into canny edges first) and scale, guess mode, and
//! the prompts' own control images an evaluation swaps in prompt by prompt.

use crate::control::Preprocess;
use crate::error::{Error, Result};
use crate::prompts::Prompt;
use crate::Pipeline;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlPlan {
    /// ControlNets: diffusers folders or original single files.
    pub controlnets: Vec<PathBuf>,
    /// For single-file ControlNets: a diffusers ControlNet folder whose config replaces the
    /// inferred one.
    pub config: Option<PathBuf>,
    /// Each ControlNet's image, or one for all.
    pub images: Vec<PathBuf>,
    /// Each ControlNet's scale, or one for all (none: 1).
    pub scales: Vec<f64>,
    pub guess_mode: bool,
    pub preprocess: Option<Preprocess>,
    /// Canny's low and high thresholds.
    pub canny_thresholds: Vec<f32>,
}

impl Default for ControlPlan {
    fn default() -> Self {
        Self {
            controlnets: vec![],
            config: None,
            images: vec![],
            scales: vec![],
            guess_mode: false,
            preprocess: None,
            canny_thresholds: vec![100.0, 200.0],
        }
    }
}

impl ControlPlan {
    /// `key=value` lines for an evaluation's manifest.
    pub fn options(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .controlnets
            .iter()
            .map(|p| format!("controlnet={}", p.display()))
            .collect();
        if let Some(c) = &self.config {
            v.push(format!("controlnet_config={}", c.display()));
        }
        v.extend(
            self.images
                .iter()
                .map(|p| format!("control_image={}", p.display())),
        );
        v.extend(self.scales.iter().map(|s| format!("controlnet_scale={s}")));
        if self.guess_mode {
            v.push("guess_mode=true".into());
        }
        if let Some(p) = self.preprocess {
            v.push(format!("control_preprocess={p:?}"));
            v.push(format!("canny_thresholds={:?}", self.canny_thresholds));
        }
        v
    }

    /// The ControlNets, their config folder and the control images, by role.
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut v: Vec<(&'static str, PathBuf)> = self
            .controlnets
            .iter()
            .map(|p| ("controlnet", p.clone()))
            .collect();
        v.extend(self.config.iter().map(|p| ("controlnet config", p.clone())));
        v.extend(self.images.iter().map(|p| ("control image", p.clone())));
        v
    }

    /// Each ControlNet's image and scale: (the images given, which of them each ControlNet
    /// takes, the scales). One value of a flag is for all; otherwise one each.
    fn images_and_scales(
        &self,
        fallback: Option<&Path>,
    ) -> Result<(Vec<PathBuf>, Vec<usize>, Vec<f64>)> {
        let n = self.controlnets.len();
        let pick = |len: usize, flag: &str| -> Result<Vec<usize>> {
            match len {
                1 => Ok(vec![0; n]),
                l if l == n => Ok((0..n).collect()),
                l => Err(Error::Invalid(format!(
                    "{l} {flag} for {n} --controlnet: give one for all or one each"
                ))),
            }
        };
        let given: Vec<PathBuf> = match (self.images.is_empty(), fallback) {
            (false, _) => self.images.clone(),
            (true, Some(f)) => vec![f.to_path_buf()],
            (true, None) => {
                return Err(Error::Invalid(
                    "--controlnet needs a --control-image".into(),
                ))
            }
        };
        let images = pick(given.len(), "--control-image")?;
        let scales: Vec<f64> = if self.scales.is_empty() {
            vec![1.0; n]
        } else {
            pick(self.scales.len(), "--controlnet-scale")?
                .into_iter()
                .map(|i| self.scales[i])
                .collect()
        };
        if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
            return Err(Error::Invalid(format!(
                "--controlnet-scale {s}: must be a number"
            )));
        }
        Ok((given, images, scales))
    }

    /// Loads each ControlNet with its image and scale into `sd`; returns the control images'
    /// size (width, height), None without ControlNets. `fallback` is the image used when none
    /// is given (an evaluation's per-prompt images replace it prompt by prompt).
    pub fn apply(
        &self,
        sd: &mut Pipeline,
        fallback: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<(usize, usize)>> {
        if self.controlnets.is_empty() {
            if !self.images.is_empty() || !self.scales.is_empty() || self.guess_mode {
                return Err(Error::Invalid(
                    "--control-image, --controlnet-scale and --guess-mode need a --controlnet"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let (given, images, scales) = self.images_and_scales(fallback)?;
        let mut size = None;
        for (k, path) in self.controlnets.iter().enumerate() {
            let model = crate::control::load(path, self.config.as_deref(), dtype, device)?;
            let file = &given[images[k]];
            let (rgb, w, h) = self.read(file)?;
            match size {
                None => size = Some((w, h)),
                Some((w0, h0)) if (w0, h0) != (w, h) => {
                    return Err(Error::file(
                        file,
                        format!("--control-image is {w}x{h}, but the first control image is {w0}x{h0}; give images of one size"),
                    ))
                }
                _ => {}
            }
            let image = crate::control::image_tensor(&rgb, w, h, device)?.to_dtype(sd.dtype())?;
            sd.add_controlnet(model, image, scales[k], path)?;
        }
        sd.set_guess_mode(self.guess_mode)?;
        Ok(size)
    }

    /// The line that says which ControlNets run at which size (None without them).
    pub fn summary(&self, size: Option<(usize, usize)>) -> Option<String> {
        let (w, h) = size?;
        let names: Vec<String> = self
            .controlnets
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let guess = if self.guess_mode { ", guess mode" } else { "" };
        Some(format!(
            "controlnet: {} ({w}x{h} control image{guess})",
            names.join(", ")
        ))
    }

    fn read(&self, file: &Path) -> Result<(Vec<u8>, usize, usize)> {
        crate::control::read_image(file, self.preprocess, &self.canny_thresholds)
    }

    /// The prompts' own control images, read once each and checked against the ControlNets
    /// and the output size before anything runs.
    pub fn prompt_images(
        &self,
        sd: &Pipeline,
        prompts: &[Prompt],
        size: Option<(usize, usize)>,
    ) -> Result<HashMap<PathBuf, Tensor>> {
        let mut out = HashMap::new();
        let listed: Vec<&PathBuf> = prompts
            .iter()
            .filter_map(|p| p.control_image.as_ref())
            .collect();
        if listed.is_empty() {
            return Ok(out);
        }
        if sd.controls().is_empty() {
            return Err(Error::file(
                listed[0],
                "the prompt file gives control images (this one first); add the --controlnet they are for",
            ));
        }
        if self.images.is_empty() && listed.len() != prompts.len() {
            return Err(Error::Invalid(
                "some prompts have no control image: give each one, or a --control-image for the rest".into(),
            ));
        }
        for path in listed {
            if out.contains_key(path) {
                continue;
            }
            let (rgb, w, h) = self.read(path)?;
            if let Some((w0, h0)) = size {
                if (w, h) != (w0, h0) {
                    return Err(Error::file(
                        path,
                        format!("{w}x{h}, but the control images are {w0}x{h0}; give images of one size"),
                    ));
                }
            }
            let t = crate::control::image_tensor(&rgb, w, h, sd.device())?.to_dtype(sd.dtype())?;
            out.insert(path.clone(), t);
        }
        Ok(out)
    }
}

/// The output size with ControlNets: the control images' unless a height or width is asked,
/// which must then agree (reneg does not resize control images).
pub fn check_size(
    control: Option<(usize, usize)>,
    height: Option<usize>,
    width: Option<usize>,
) -> Result<(Option<usize>, Option<usize>)> {
    let Some((w, h)) = control else {
        return Ok((height, width));
    };
    if height.is_some_and(|x| x != h) || width.is_some_and(|x| x != w) {
        return Err(Error::Invalid(format!(
            "--control-image is {w}x{h} but --width/--height ask for {}x{}: resize the control image or leave the size out",
            width.unwrap_or(w),
            height.unwrap_or(h)
        )));
    }
    Ok((Some(h), Some(w)))
}

/// Sets every ControlNet's image to the prompt's own, or back to `defaults` when it has none.
pub fn use_prompt_image(
    sd: &mut Pipeline,
    prompt: &Prompt,
    images: &HashMap<PathBuf, Tensor>,
    defaults: &[Tensor],
) {
    for (k, c) in sd.controls_mut().iter_mut().enumerate() {
        c.image = match prompt.control_image.as_ref().and_then(|p| images.get(p)) {
            Some(t) => t.clone(),
            None => defaults[k].clone(),
        };
    }
}
