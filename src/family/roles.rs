//! The three roles a family fills, whatever its models: a prompt encoder (text to
//! [`Conditioning`]), a denoiser (latents, timestep and conditioning to the model output) and a
//! decoder (latents to pixels). [`crate::Pipeline`] holds one of each with the sampler and
//! writes guidance, the sampling loop, the guided x0 and ReNeg's step once against them.
//!
//! What only some families have (textual inversions, clip skip, A1111 syntax, ControlNets, a
//! replacement VAE) is an optional capability: the default refuses it, and the pipeline's
//! error names the family, so a flag that does not apply is never silently ignored.

use crate::conditioning::{Conditioning, Shape};
use crate::control::Control;
use crate::embedding::textual_inversion::TextualInversion;
use crate::error::{Error, Result};
use crate::prompt_syntax::PromptSyntax;
use candle_core::Tensor;
use std::any::Any;
use std::path::Path;

/// An option this family has no place for.
pub fn unsupported(what: &str) -> Error {
    Error::NotInFamily { what: what.into() }
}

/// Text to conditioning.
pub trait PromptEncoder: Send + Sync {
    /// The conditioning of one prompt, batch 1.
    fn encode(&self, text: &str) -> Result<Conditioning>;

    /// What the family's pipeline conditions the negative branch on when no negative is
    /// given (diffusers: the encoding of "", or zeros for SDXL's `force_zeros_for_empty_prompt`).
    fn no_negative(&self) -> Result<Conditioning> {
        self.encode("")
    }

    /// What [`Self::no_negative`] is, for the first lines of a run.
    fn no_negative_label(&self) -> &'static str {
        "the encoding of \"\" (null text)"
    }

    /// Conditionings (batch 1 or more each) concatenated along the batch; an encoder whose
    /// prompts can differ in length first makes them equal.
    fn batch(&self, conds: &[&Conditioning]) -> Result<Conditioning> {
        Conditioning::cat(conds)
    }

    /// The shape of one prompt's conditioning.
    fn shape(&self) -> Shape;

    /// Encodes `texts` now, all of a run's prompts, so that an encoder costly to hold can be
    /// let go before sampling (PixArt's T5-XXL); later `encode` calls for them are served
    /// from what it kept. The others keep their small encoders: nothing to do.
    fn encode_ahead(&self, _texts: &[&str]) -> Result<()> {
        Ok(())
    }

    /// An error if `text` could not be encoded (e.g. it names an embedding that is not
    /// loaded), without encoding it.
    fn check_prompt(&self, _text: &str) -> Result<()> {
        Ok(())
    }

    fn add_textual_inversion(&mut self, _ti: TextualInversion, _path: &Path) -> Result<()> {
        Err(unsupported("textual inversions"))
    }
    fn set_clip_skip(&mut self, _skip: usize) -> Result<()> {
        Err(unsupported("clip skip values"))
    }
    /// A file of prompt encodings to read and extend (`--text-cache`): for an encoder costly
    /// enough to keep out of memory when every prompt is in it (PixArt's T5-XXL).
    fn set_text_cache(&mut self, _file: &Path) -> Result<()> {
        Err(unsupported("text-encoding caches (--text-cache)"))
    }
    /// The prompt length in tokens (diffusers' `max_sequence_length`, for an encoder whose
    /// pipeline takes one: PixArt's T5, 120 by default, PixArt-Sigma's 300).
    fn set_max_length(&mut self, _tokens: usize) -> Result<()> {
        Err(unsupported("prompt lengths (--max-sequence-length)"))
    }
    fn set_prompt_syntax(&mut self, syntax: PromptSyntax) -> Result<()> {
        match syntax {
            PromptSyntax::Plain => Ok(()),
            _ => Err(unsupported("A1111 prompt syntax settings")),
        }
    }
    fn set_checkpointing(&mut self, _on: bool) {}
    fn as_any(&self) -> &dyn Any;
}

/// Which guidance branches a denoiser call holds: ControlNets' guess mode treats them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// The negative's half then the prompt's, batched.
    Both,
    Negative,
    Prompt,
}

/// What a family's own scripts sample with when the user says nothing: guidance, steps, DDIM's
/// eta and a clip's frame rate (played back at, and for VideoCrafter2 conditioned on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub guidance_scale: f64,
    pub steps: usize,
    pub eta: f64,
    pub fps: u32,
}

impl Default for Defaults {
    /// Stable Diffusion's (diffusers' guidance 7.5; reneg's 30 DDIM steps; 8 fps playback).
    fn default() -> Self {
        Self {
            guidance_scale: 7.5,
            steps: 30,
            eta: 0.0,
            fps: 8,
        }
    }
}

/// SDXL's size conditioning (diffusers' `original_size`, `target_size`,
/// `crops_coords_top_left`, in pixels as (height, width) and (top, left)); None: the image's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizeConditioning {
    pub original: Option<(usize, usize)>,
    pub target: Option<(usize, usize)>,
    pub crops_top_left: (usize, usize),
}

impl SizeConditioning {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Latents, timestep and conditioning to the model output (noise, v or x0 as the sampler's
/// config says). Latents keep the VAE's layout here: `[b, C, h, w]`, a video's
/// `[b, C, frames, h, w]`; a family that patches them into tokens does so inside.
pub trait Denoiser: Send + Sync {
    /// The output for `x` at timestep `t` under `cond` (same batch), `branch` saying which
    /// guidance branch(es) `x` holds.
    fn forward(&self, x: &Tensor, t: f64, cond: &Conditioning, branch: Branch) -> Result<Tensor>;

    fn latent_channels(&self) -> usize;
    /// Whether latents have a frames axis.
    fn is_video(&self) -> bool;
    /// The latent side the model was trained at, when its config says.
    fn sample_size(&self) -> Option<usize>;
    /// Latent sides must be multiples of this.
    fn size_multiple(&self) -> usize;
    fn set_checkpointing(&mut self, _on: bool) {}

    /// The family's sampling defaults.
    fn defaults(&self) -> Defaults {
        Defaults::default()
    }

    /// The frame rate the model is conditioned on, for a family that conditions on one
    /// (VideoCrafter2); None for the others, whose clips only play back at a rate.
    fn frame_rate(&self) -> Option<f64> {
        None
    }
    fn set_frame_rate(&mut self, _fps: f64) -> Result<()> {
        Err(unsupported("frame-rate conditioning"))
    }
    /// SDXL's size conditioning (--original-size, --target-size, --crops-coords-top-left).
    fn set_size_conditioning(&mut self, _sizes: SizeConditioning) -> Result<()> {
        Err(unsupported(
            "size conditioning (--original-size, --target-size, --crops-coords-top-left)",
        ))
    }

    /// Bytes the gradient step's graph keeps through this denoiser for one sample of
    /// `h x w` latents, `(plain, checkpointed)` per byte of element size (`crate::train::memory`).
    fn graph_elems(&self, _h: u64, _w: u64) -> Option<(u64, u64)> {
        None
    }

    fn add_controlnet(
        &mut self,
        _model: crate::models::controlnet::ControlNetModel,
        _image: Tensor,
        _scale: f64,
        _source: &Path,
    ) -> Result<()> {
        Err(unsupported("ControlNets"))
    }
    fn set_guess_mode(&mut self, on: bool) -> Result<()> {
        if on {
            Err(unsupported("ControlNet guess mode settings"))
        } else {
            Ok(())
        }
    }
    fn controls(&self) -> &[Control] {
        &[]
    }
    fn controls_mut(&mut self) -> &mut [Control] {
        &mut []
    }
    fn as_any(&self) -> &dyn Any;
}

/// Latents (as sampled, one image's layout) to pixels.
pub trait Decoder: Send + Sync {
    /// `[b, C, h, w]` latents as sampled to raw pixels `[b, 3, H, W]` in about [-1, 1].
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;
    /// Pixels per latent along a side.
    fn scale(&self) -> usize;
    fn latent_channels(&self) -> usize;
    fn set_checkpointing(&mut self, _on: bool) {}
    /// `(plain, checkpointed)` elements its graph keeps for one sample of `h x w` latents.
    fn graph_elems(&self, _h: u64, _w: u64) -> Option<(u64, u64)> {
        None
    }
    /// Replaces the decoder with the one in `dir` (a fine-tuned VAE).
    fn replace(&mut self, _dir: &Path) -> Result<()> {
        Err(unsupported("replacement VAEs"))
    }
    fn as_any(&self) -> &dyn Any;
}
