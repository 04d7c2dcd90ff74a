//! The networks of a Stable Diffusion pipeline, one architecture per file, each loaded from
//! the owner's config.json and state-dict key names.

pub mod clip_layers;
pub mod clip_text;
pub mod clip_vision;
pub mod config;
pub mod controlnet;
pub mod open_clip;
pub mod pixart;
pub mod resnet;
pub mod t5;
pub mod temporal;
pub mod transformer;
pub mod unet;
pub mod vae;
