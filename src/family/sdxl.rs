//! Stable Diffusion XL (diffusers' `StableDiffusionXLPipeline`): two CLIP text encoders whose
//! second-to-last hidden states are concatenated, the second's projected end-of-text state as
//! the pooled embedding; a `UNet2DConditionModel` with `text_time` added conditioning (the
//! pooled text and six size ids, [`crate::models::unet::TextTimeEmbedding`]); the VAE, decoded
//! in f32 where diffusers upcasts it. The negative is the pair (`negative_prompt_embeds`,
//! `negative_pooled_prompt_embeds`); without one the pipeline uses zeros when the folder says
//! `force_zeros_for_empty_prompt` (SDXL base does), else the encoding of "".

use super::roles::{Branch, Defaults, Denoiser, PromptEncoder, SizeConditioning};
use super::sd::{weights_file, VaeDecoder, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};
use super::Roles;
use crate::conditioning::{Conditioning, Shape};
use crate::error::{read_json, Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::nn::Linear;
use crate::tokenizer::ClipTokenizer;
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor};
use std::any::Any;
use std::path::Path;

/// What diffusers' SDXL pipeline samples with by default: guidance 5 (50 steps there; reneg
/// keeps its 30).
pub const DEFAULTS: Defaults = Defaults {
    guidance_scale: 5.0,
    steps: 30,
    eta: 0.0,
    fps: 8,
};

/// Both tokenizers and text encoders, and `text_encoder_2`'s projection.
pub struct SdxlEncoder {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    /// `text_encoder_2.text_projection` (no bias): the pooled embedding's projection.
    pub text_projection: Linear,
    /// The pooled embedding's width (`projection_dim`).
    pub pooled_dim: usize,
    /// `force_zeros_for_empty_prompt` of `model_index.json`.
    pub force_zeros: bool,
    device: Device,
}

impl SdxlEncoder {
    /// Each tokenizer's ids of `text`, `[1, 77]` u32.
    pub fn token_ids(&self, text: &str) -> Result<(Tensor, Tensor)> {
        let ids = |t: &ClipTokenizer| -> Result<Tensor> {
            let v = t.encode(text);
            Ok(Tensor::from_vec(v.clone(), (1, v.len()), &self.device)?)
        };
        Ok((ids(&self.tokenizer)?, ids(&self.tokenizer_2)?))
    }

    /// The conditioning of token ids (`encode_prompt` of diffusers' pipeline): `[b, 77, D1 +
    /// D2]` from both encoders' `hidden_states[-2]`, pooled `[b, P]`.
    pub fn encode_ids(&self, ids: &Tensor, ids_2: &Tensor) -> Result<Conditioning> {
        let (h1, _) = self.text_encoder.penultimate_and_last(ids)?;
        let (h2, last2) = self.text_encoder_2.penultimate_and_last(ids_2)?;
        let pooled = self.text_encoder_2.pooled(&last2, ids_2)?;
        let pooled = self.text_projection.forward(&pooled)?;
        Ok(Conditioning {
            embeds: Tensor::cat(&[&h1, &h2.to_dtype(h1.dtype())?], 2)?,
            pooled: Some(pooled.to_dtype(h1.dtype())?),
            mask: None,
        })
    }
}

impl PromptEncoder for SdxlEncoder {
    fn encode(&self, text: &str) -> Result<Conditioning> {
        let (a, b) = self.token_ids(text)?;
        self.encode_ids(&a, &b)
    }

    fn no_negative(&self) -> Result<Conditioning> {
        if !self.force_zeros {
            return self.encode("");
        }
        let c = self.encode("")?;
        c.map(|_, t| Ok(t.zeros_like()?))
    }

    fn no_negative_label(&self) -> &'static str {
        if self.force_zeros {
            "zeros (force_zeros_for_empty_prompt)"
        } else {
            "the encoding of \"\" (force_zeros_for_empty_prompt is false)"
        }
    }

    fn shape(&self) -> Shape {
        Shape {
            tokens: self.tokenizer.max_len(),
            width: self.text_encoder.hidden_size() + self.text_encoder_2.hidden_size(),
            pooled: Some(self.pooled_dim),
            mask: false,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The UNet with its added conditioning: the pooled embedding from the conditioning, the size
/// ids from the latents' size and the user's size conditioning.
pub struct SdxlDenoiser {
    pub unet: UNet2DConditionModel,
    pub sizes: SizeConditioning,
    /// Pixels per latent (the VAE's), to turn the latents' size into the image's.
    pub vae_scale: usize,
}

impl SdxlDenoiser {
    /// diffusers' `add_time_ids` for latents of `h x w`: original size, crop's top-left,
    /// target size, the sizes defaulting to the image's.
    pub fn time_ids(&self, h: usize, w: usize) -> [f64; 6] {
        let image = (h * self.vae_scale, w * self.vae_scale);
        let (oh, ow) = self.sizes.original.unwrap_or(image);
        let (th, tw) = self.sizes.target.unwrap_or(image);
        let (ct, cl) = self.sizes.crops_top_left;
        [oh, ow, ct, cl, th, tw].map(|v| v as f64)
    }
}

impl Denoiser for SdxlDenoiser {
    fn forward(&self, x: &Tensor, t: f64, cond: &Conditioning, _: Branch) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let pooled = cond.pooled.as_ref().ok_or_else(|| {
            Error::Invalid(
                "SDXL conditions on a pooled embedding; this conditioning has none".into(),
            )
        })?;
        let added = self
            .unet
            .text_time_embedding(pooled, &vec![self.time_ids(h, w); b])?;
        self.unet
            .forward_added(x, &vec![t; b], &cond.embeds, &added)
    }

    fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    fn is_video(&self) -> bool {
        false
    }

    fn sample_size(&self) -> Option<usize> {
        self.unet.config().sample_size
    }

    /// diffusers' SDXL takes any multiple of 8 pixels: the UNet upsamples to its skips' sizes.
    fn size_multiple(&self) -> usize {
        1
    }

    fn set_checkpointing(&mut self, on: bool) {
        self.unet.set_checkpointing(on);
    }

    fn defaults(&self) -> Defaults {
        DEFAULTS
    }

    fn set_size_conditioning(&mut self, sizes: SizeConditioning) -> Result<()> {
        self.sizes = sizes;
        Ok(())
    }

    fn graph_elems(&self, h: u64, w: u64) -> Option<(u64, u64)> {
        Some(crate::train::memory::unet_graph_elems(
            self.unet.config(),
            h,
            w,
        ))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A text encoder folder of transformers' (`config.json` and weights) and its weights.
fn load_text_encoder(dir: &Path, dtype: DType, device: &Device) -> Result<(ClipTextModel, Vb)> {
    let cfg = ClipTextConfig::load(&dir.join("config.json"))?;
    let vb = Vb::new(Weights::load(
        &weights_file(dir, TRANSFORMERS_WEIGHTS)?,
        dtype,
        device,
    )?);
    Ok((ClipTextModel::new(cfg, &vb)?, vb))
}

/// The models of an SDXL pipeline, loaded from a folder or converted from a single file.
struct Models {
    tokenizers: (ClipTokenizer, ClipTokenizer),
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
    /// `text_encoder_2.text_projection` and its output width.
    projection: (Linear, usize),
    unet: UNet2DConditionModel,
    /// The VAE and the dtype its weights were loaded in (f32 where diffusers upcasts).
    vae: (AutoencoderKL, DType),
    force_zeros: bool,
}

/// The VAE's dtype: diffusers decodes a half-precision VAE in f32 when its config says
/// `force_upcast` (true by default).
fn vae_dtype(config: &serde_json::Value, dtype: DType) -> DType {
    let upcast = config["force_upcast"].as_bool().unwrap_or(true);
    if upcast && dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// text_encoder_2's projection (`projection_dim` of its config) under `vb`.
fn projection(
    te2: &ClipTextModel,
    cfg2: &serde_json::Value,
    vb: &Vb,
    file: &Path,
) -> Result<(Linear, usize)> {
    let dim = cfg2["projection_dim"].as_u64().ok_or_else(|| {
        Error::file(
            file,
            "projection_dim is missing (CLIPTextModelWithProjection's)",
        )
    })? as usize;
    let p = Linear::new(te2.hidden_size(), dim, false, &vb.pp("text_projection"))?;
    Ok((p, dim))
}

/// The roles of loaded models, checking that they fit one another (`root` names the model).
fn roles(m: Models, root: &Path, device: &Device) -> Result<Roles> {
    let unet_cfg = m.unet.config();
    if unet_cfg.addition_embed_type.as_deref() != Some("text_time") {
        return Err(Error::file(
            root,
            "its UNet is not an SDXL UNet (addition_embed_type is not text_time)",
        ));
    }
    let encoder = SdxlEncoder {
        tokenizer: m.tokenizers.0,
        tokenizer_2: m.tokenizers.1,
        text_encoder: m.text_encoder,
        text_encoder_2: m.text_encoder_2,
        text_projection: m.projection.0,
        pooled_dim: m.projection.1,
        force_zeros: m.force_zeros,
        device: device.clone(),
    };
    let width = encoder.shape().width;
    if unet_cfg.context_dim() != width {
        return Err(Error::file(
            root,
            format!(
                "the text encoders give {width} wide embeddings; the UNet's cross_attention_dim is {}",
                unet_cfg.context_dim()
            ),
        ));
    }
    let (vae, vae_dtype) = m.vae;
    let vae_scale = vae.config().downscale();
    let decoder = VaeDecoder::new(vae, vae_dtype, device);
    let denoiser = SdxlDenoiser {
        unet: m.unet,
        sizes: SizeConditioning::default(),
        vae_scale,
    };
    Ok((Box::new(encoder), Box::new(denoiser), Box::new(decoder)))
}

fn no_loras(loras: &[crate::lora::Lora], root: &Path) -> Result<()> {
    if loras.is_empty() {
        return Ok(());
    }
    Err(Error::file(
        root,
        "is an SDXL model: reneg does not merge LoRAs into SDXL yet; drop --lora",
    ))
}

/// The roles of a `StableDiffusionXLPipeline` folder.
pub fn load_folder(
    root: &Path,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<Roles> {
    no_loras(loras, root)?;
    let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
    let force_zeros = index
        .get("force_zeros_for_empty_prompt")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let (text_encoder, _) = load_text_encoder(&root.join("text_encoder"), dtype, device)?;
    let te2_dir = root.join("text_encoder_2");
    if !te2_dir.is_dir() {
        return Err(Error::file(
            root,
            "an SDXL folder needs text_encoder_2/ (the OpenCLIP bigG encoder)",
        ));
    }
    let (text_encoder_2, vb2) = load_text_encoder(&te2_dir, dtype, device)?;
    let cfg2: serde_json::Value = read_json(&te2_dir.join("config.json"))?;
    let projection = projection(&text_encoder_2, &cfg2, &vb2, &te2_dir.join("config.json"))?;
    let unet_dir = root.join("unet");
    let unet_cfg = UNetConfig::load(&unet_dir.join("config.json"))?;
    let unet_vb = Vb::new(Weights::load(
        &weights_file(&unet_dir, DIFFUSERS_WEIGHTS)?,
        dtype,
        device,
    )?);
    let unet = UNet2DConditionModel::new(unet_cfg, &unet_vb)?;
    let vae_dir = root.join("vae");
    let vd = vae_dtype(&read_json(&vae_dir.join("config.json"))?, dtype);
    let vae = AutoencoderKL::new(
        VaeConfig::load(&vae_dir.join("config.json"))?,
        &Vb::new(Weights::load(
            &weights_file(&vae_dir, DIFFUSERS_WEIGHTS)?,
            vd,
            device,
        )?),
    )?;
    let models = Models {
        tokenizers: (
            ClipTokenizer::from_dir(&root.join("tokenizer"))?,
            ClipTokenizer::from_dir(&root.join("tokenizer_2"))?,
        ),
        text_encoder,
        text_encoder_2,
        projection,
        unet,
        vae: (vae, vd),
        force_zeros,
    };
    roles(models, root, device)
}

/// An original SDXL single file (`sd_xl_base_1.0.safetensors`; `all` its tensors), converted
/// by `single_file::convert_sdxl`; tokenizers from the override folder, else the CLIP
/// vocabulary built in (padded with "<|endoftext|>" and "!" as SDXL ships them).
pub fn load_single_file(
    all: std::collections::HashMap<String, Tensor>,
    path: &Path,
    overrides: &crate::single_file::Overrides,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<crate::Pipeline> {
    use crate::scheduler::SchedulerConfig;
    no_loras(loras, path)?;
    let c = crate::single_file::convert_sdxl(&all, path, overrides)?;
    drop(all);
    let label = |what: &str| std::path::PathBuf::from(format!("{} ({what})", path.display()));
    let vb = |t, what: &str, dtype| Vb::new(Weights::from_tensors(t, &label(what), dtype, device));
    let text_encoder = ClipTextModel::new(
        ClipTextConfig::from_value(c.text_config, &label("text encoder config"))?,
        &vb(c.text_encoder, "text encoder", dtype),
    )?;
    let vb2 = vb(c.text_encoder_2, "text encoder 2", dtype);
    let text_encoder_2 = ClipTextModel::new(
        ClipTextConfig::from_value(c.text_config_2.clone(), &label("text encoder 2 config"))?,
        &vb2,
    )?;
    let projection = projection(
        &text_encoder_2,
        &c.text_config_2,
        &vb2,
        &label("text encoder 2 config"),
    )?;
    let unet = UNet2DConditionModel::new(
        UNetConfig::from_value(c.unet_config, &label("unet config"))?,
        &vb(c.unet, "unet", dtype),
    )?;
    let vd = vae_dtype(&c.vae_config, dtype);
    let vae = AutoencoderKL::new(
        VaeConfig::from_value(c.vae_config, &label("vae config"))?,
        &vb(c.vae, "vae", vd),
    )?;
    let tok = |rel: &str, pad: &str| -> Result<ClipTokenizer> {
        match overrides
            .config_dir
            .as_ref()
            .map(|d| d.join(rel))
            .filter(|d| d.is_dir())
        {
            Some(d) => ClipTokenizer::from_dir(&d),
            None => ClipTokenizer::embedded(pad),
        }
    };
    let models = Models {
        tokenizers: (tok("tokenizer", "<|endoftext|>")?, tok("tokenizer_2", "!")?),
        text_encoder,
        text_encoder_2,
        projection,
        unet,
        vae: (vae, vd),
        force_zeros: true,
    };
    let roles = roles(models, path, device)?;
    let scheduler = SchedulerConfig::from_value(c.scheduler_config, &label("scheduler config"))?;
    crate::Pipeline::from_roles(roles, scheduler, path, dtype, device)
}
