//! lvdm's inference config (`configs/inference_t2v_512_v2.0.yaml`: `model.target`
//! LatentDiffusion with `unet_config`, `first_stage_config`, `cond_stage_config`), read for what
//! decides the model's shape and sampling. Settings reneg does not implement are refused by
//! name; keys it does not need (training's, logging's) are ignored, as lvdm's inference does.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

const LATENT_DIFFUSION: &str = "lvdm.models.ddpm3d.LatentDiffusion";
const UNET: &str = "lvdm.modules.networks.openaimodel3d.UNetModel";
const OPEN_CLIP: &str = "lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder";
const AUTOENCODER: &str = "lvdm.models.autoencoder.AutoencoderKL";

#[derive(Debug, Clone, Deserialize)]
struct File {
    model: Target<DiffusionParams>,
}

#[derive(Debug, Clone, Deserialize)]
struct Target<P> {
    target: String,
    params: P,
}

/// `model.params`: LatentDiffusion's settings (lvdm's defaults where the file is silent).
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusionParams {
    #[serde(default = "d_linear_start")]
    pub linear_start: f64,
    #[serde(default = "d_linear_end")]
    pub linear_end: f64,
    #[serde(default = "d_timesteps")]
    pub timesteps: usize,
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default = "d_eps")]
    pub parameterization: String,
    #[serde(default = "d_scale_factor")]
    pub scale_factor: f64,
    #[serde(default)]
    pub use_scale: bool,
    #[serde(default = "d_one")]
    pub scale_a: f64,
    #[serde(default = "d_one")]
    pub scale_b: f64,
    #[serde(default = "d_mid_step")]
    pub mid_step: usize,
    #[serde(default)]
    pub fix_scale_bug: bool,
    #[serde(default = "d_crossattn")]
    pub conditioning_key: String,
    #[serde(default = "d_empty_seq")]
    pub uncond_type: String,
    unet_config: Target<UnetParams>,
    first_stage_config: Target<serde_yaml::Value>,
    cond_stage_config: Target<TextParams>,
}

fn d_linear_start() -> f64 {
    0.00085
}
fn d_linear_end() -> f64 {
    0.012
}
fn d_timesteps() -> usize {
    1000
}
fn d_linear() -> String {
    "linear".into()
}
fn d_eps() -> String {
    "eps".into()
}
fn d_scale_factor() -> f64 {
    0.18215
}
fn d_one() -> f64 {
    1.0
}
fn d_mid_step() -> usize {
    400
}
fn d_crossattn() -> String {
    "crossattn".into()
}
fn d_empty_seq() -> String {
    "empty_seq".into()
}
fn d_minus_one() -> i64 {
    -1
}
fn d_true() -> bool {
    true
}
fn d_vit_h() -> String {
    "ViT-H-14".into()
}
fn d_last() -> String {
    "last".into()
}

/// `unet_config.params`, with `UNetModel.__init__`'s defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct UnetParams {
    pub in_channels: usize,
    pub model_channels: usize,
    pub out_channels: usize,
    pub num_res_blocks: usize,
    pub attention_resolutions: Vec<usize>,
    #[serde(default = "d_channel_mult")]
    pub channel_mult: Vec<usize>,
    pub context_dim: usize,
    #[serde(default = "d_minus_one")]
    pub num_heads: i64,
    #[serde(default = "d_minus_one")]
    pub num_head_channels: i64,
    #[serde(default = "d_one_usize")]
    pub transformer_depth: usize,
    #[serde(default = "d_one_usize")]
    pub temporal_transformer_depth: usize,
    #[serde(default)]
    pub use_linear: bool,
    #[serde(default)]
    pub temporal_conv: bool,
    #[serde(default = "d_true")]
    pub temporal_attention: bool,
    #[serde(default = "d_true")]
    pub temporal_selfatt_only: bool,
    #[serde(default = "d_true")]
    pub use_relative_position: bool,
    #[serde(default)]
    pub use_causal_attention: bool,
    #[serde(default)]
    pub addition_attention: bool,
    #[serde(default)]
    pub use_image_attention: bool,
    #[serde(default)]
    pub tempspatial_aware: bool,
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    #[serde(default)]
    pub resblock_updown: bool,
    #[serde(default = "d_two")]
    pub dims: usize,
    #[serde(default)]
    pub fps_cond: bool,
    #[serde(default)]
    pub temporal_length: Option<usize>,
}

fn d_channel_mult() -> Vec<usize> {
    vec![1, 2, 4, 8]
}
fn d_one_usize() -> usize {
    1
}
fn d_two() -> usize {
    2
}

impl UnetParams {
    /// Whether each level has transformers (lvdm: its downsampling factor is listed).
    pub fn attention_levels(&self) -> Vec<bool> {
        (0..self.channel_mult.len())
            .map(|l| self.attention_resolutions.contains(&(1usize << l)))
            .collect()
    }
}

/// `cond_stage_config.params` of the OpenCLIP embedder.
#[derive(Debug, Clone, Deserialize)]
pub struct TextParams {
    #[serde(default = "d_vit_h")]
    pub arch: String,
    #[serde(default = "d_last")]
    pub layer: String,
    #[serde(default = "d_max_length")]
    pub max_length: usize,
}

fn d_max_length() -> usize {
    77
}

/// A VideoCrafter (lvdm LatentDiffusion) config, checked against what reneg runs.
#[derive(Debug, Clone)]
pub struct LvdmConfig {
    pub diffusion: DiffusionParams,
    pub unet: UnetParams,
    pub text: TextParams,
    /// The autoencoder's `ddconfig`, as written (its shape is read off the weights).
    pub first_stage: serde_yaml::Value,
}

impl LvdmConfig {
    /// Reads and checks the yaml config at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Self::parse(&text, path)
    }

    /// VideoCrafter2's own inference config (`inference_t2v_512_v2.0.yaml`), for a checkpoint
    /// given without one.
    pub fn videocrafter2() -> Self {
        Self::parse(VIDEOCRAFTER2, Path::new("(built-in VideoCrafter2 config)"))
            .expect("the built-in config is valid")
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let file: File = serde_yaml::from_str(text)
            .map_err(|e| Error::file(path, format!("not a VideoCrafter (lvdm) config: {e}")))?;
        let m = file.model;
        let d = m.params;
        let check = |what: &str, have: &str, want: &str| -> Result<()> {
            if have == want {
                Ok(())
            } else {
                Err(Error::file(
                    path,
                    format!(
                        "{what} is {have}; reneg runs {want} (VideoCrafter2's inference config)"
                    ),
                ))
            }
        };
        check("model.target", &m.target, LATENT_DIFFUSION)?;
        check("unet_config.target", &d.unet_config.target, UNET)?;
        check(
            "cond_stage_config.target",
            &d.cond_stage_config.target,
            OPEN_CLIP,
        )?;
        check(
            "first_stage_config.target",
            &d.first_stage_config.target,
            AUTOENCODER,
        )?;
        check("model.params.parameterization", &d.parameterization, "eps")?;
        check("model.params.beta_schedule", &d.beta_schedule, "linear")?;
        check(
            "model.params.conditioning_key",
            &d.conditioning_key,
            "crossattn",
        )?;
        check("model.params.uncond_type", &d.uncond_type, "empty_seq")?;
        let u = &d.unet_config.params;
        let flags = [
            ("temporal_conv", u.temporal_conv, true),
            ("temporal_attention", u.temporal_attention, true),
            ("temporal_selfatt_only", u.temporal_selfatt_only, true),
            ("use_relative_position", u.use_relative_position, false),
            ("use_causal_attention", u.use_causal_attention, false),
            ("addition_attention", u.addition_attention, true),
            ("use_image_attention", u.use_image_attention, false),
            ("tempspatial_aware", u.tempspatial_aware, false),
            ("use_scale_shift_norm", u.use_scale_shift_norm, false),
            ("resblock_updown", u.resblock_updown, false),
            ("use_linear", u.use_linear, true),
        ];
        for (key, have, want) in flags {
            if have != want {
                return Err(Error::file(
                    path,
                    format!("unet_config.params.{key} is {have}; reneg runs VideoCrafter2's UNet ({key}: {want}); VideoCrafter1's configs are not supported"),
                ));
            }
        }
        let numbers = [
            ("dims", u.dims, 2),
            ("transformer_depth", u.transformer_depth, 1),
            (
                "temporal_transformer_depth",
                u.temporal_transformer_depth,
                1,
            ),
        ];
        for (key, have, want) in numbers {
            if have != want {
                return Err(Error::file(
                    path,
                    format!("unet_config.params.{key} is {have}; only {want} is supported"),
                ));
            }
        }
        if u.num_head_channels <= 0 || u.num_heads != -1 {
            return Err(Error::file(
                path,
                "unet_config.params: only heads of a fixed width (num_head_channels, no num_heads) are supported, as VideoCrafter2 has",
            ));
        }
        if u.model_channels == 0 || u.channel_mult.is_empty() || u.num_res_blocks == 0 {
            return Err(Error::file(
                path,
                "unet_config.params: model_channels, channel_mult and num_res_blocks must be positive",
            ));
        }
        let t = &d.cond_stage_config.params;
        if t.layer != "penultimate" && t.layer != "last" {
            return Err(Error::file(
                path,
                format!(
                    "cond_stage_config.params.layer is {}; lvdm takes last or penultimate",
                    t.layer
                ),
            ));
        }
        if d.timesteps < 2 {
            return Err(Error::file(
                path,
                "model.params.timesteps must be at least 2",
            ));
        }
        Ok(Self {
            unet: d.unet_config.params.clone(),
            text: d.cond_stage_config.params.clone(),
            first_stage: d.first_stage_config.params.clone(),
            diffusion: d,
        })
    }

    /// Heads of the UNet's width-`num_head_channels` attention.
    pub fn head_channels(&self) -> usize {
        self.unet.num_head_channels as usize
    }

    /// The scheduler config of lvdm's DDIM on this process: its `uniform` timesteps
    /// (`range(0, T, T // steps) + 1`), alpha-bar after the last step `alphas_cumprod[0]`,
    /// no clipping. The tables (the checkpoint's buffers) are set by the loader.
    pub fn scheduler_json(&self) -> serde_json::Value {
        let d = &self.diffusion;
        serde_json::json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": d.timesteps,
            "beta_start": d.linear_start,
            "beta_end": d.linear_end,
            // lvdm's "linear" is linspace(sqrt(start), sqrt(end))^2: diffusers' scaled_linear.
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "timestep_spacing": "uniform",
            "steps_offset": 1,
            "set_alpha_to_one": false,
            "clip_sample": false,
        })
    }

    /// lvdm's alpha-bar of this process (`register_schedule`: betas in f64, cumprod in f64,
    /// stored as f32), for a checkpoint that lacks the buffer.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let d = &self.diffusion;
        let n = d.timesteps;
        let (a, b) = (d.linear_start.sqrt(), d.linear_end.sqrt());
        let mut acc = 1f64;
        (0..n)
            .map(|i| {
                let s = a + (b - a) * i as f64 / (n - 1) as f64;
                acc *= 1.0 - s * s;
                acc as f32
            })
            .collect()
    }

    /// lvdm's `scale_arr` (`use_scale`): linspace(scale_a, scale_b, mid_step) then scale_b,
    /// `timesteps` more of them as lvdm does with `fix_scale_bug` off (T - mid_step with it on),
    /// for a checkpoint that lacks the buffer. None without `use_scale`.
    pub fn scale_arr(&self) -> Option<Vec<f32>> {
        let d = &self.diffusion;
        if !d.use_scale {
            return None;
        }
        let m = d.mid_step;
        let mut v: Vec<f32> = (0..m)
            .map(|i| {
                let f = if m > 1 {
                    i as f64 / (m - 1) as f64
                } else {
                    0.0
                };
                (d.scale_a + (d.scale_b - d.scale_a) * f) as f32
            })
            .collect();
        let tail = if d.fix_scale_bug {
            d.timesteps.saturating_sub(m)
        } else {
            d.timesteps
        };
        v.extend(std::iter::repeat_n(d.scale_b as f32, tail));
        Some(v)
    }
}

/// VideoCrafter2's settings (the values of its `inference_t2v_512_v2.0.yaml`), restated.
const VIDEOCRAFTER2: &str = r#"
model:
  target: lvdm.models.ddpm3d.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    conditioning_key: crossattn
    channels: 4
    scale_factor: 0.18215
    uncond_type: empty_seq
    use_scale: true
    scale_b: 0.7
    unet_config:
      target: lvdm.modules.networks.openaimodel3d.UNetModel
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
        num_head_channels: 64
        transformer_depth: 1
        context_dim: 1024
        use_linear: true
        temporal_conv: true
        temporal_attention: true
        temporal_selfatt_only: true
        use_relative_position: false
        use_causal_attention: false
        temporal_length: 16
        addition_attention: true
        fps_cond: true
    first_stage_config:
      target: lvdm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: true, z_channels: 4, resolution: 512, in_channels: 3, out_ch: 3,
                   ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [],
                   dropout: 0.0}
    cond_stage_config:
      target: lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder
      params:
        freeze: true
        layer: penultimate
"#;
