//! PixArt-α (diffusers' `PixArtAlphaPipeline`): T5 v1.1's encoder (forward only) with its
//! sentencepiece tokenizer, `PixArtTransformer2DModel` (a diffusion transformer with
//! adaLN-single; the 1024 model conditions on the image's resolution and aspect ratio), the
//! `AutoencoderKL`. The negative is the pair (`negative_prompt_embeds` `[1, 120, 4096]`,
//! `negative_prompt_attention_mask` `[1, 120]`): the mask keeps the padding rows out of the
//! cross-attention, so a negative without one is refused rather than guessed, except the
//! official ReNeg file, whose rows are T5's output for "" and take the mask of "".

use super::roles::{Branch, Defaults, Denoiser, PromptEncoder};
use super::sd::{load_weights, VaeDecoder, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};
use super::Roles;
use crate::conditioning::{Conditioning, Shape};
use crate::error::{Error, Result};
use crate::models::pixart::{PixArtConfig, PixArtTransformer2DModel};
use crate::models::t5::{T5Config, T5EncoderModel};
use crate::t5_tokenizer::T5Tokenizer;
use crate::weights::Vb;
use candle_core::{DType, Device, Tensor};
use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// PixArt-α's prompt length (`max_sequence_length` of its pipeline).
pub const MAX_SEQUENCE_LENGTH: usize = 120;

/// What diffusers' PixArt-α pipeline samples with by default: guidance 4.5, 20 steps of its
/// DPM-Solver++.
pub const DEFAULTS: Defaults = Defaults {
    guidance_scale: 4.5,
    steps: 20,
    eta: 0.0,
    fps: 8,
};

/// T5's tokenizer and encoder. Each distinct prompt runs T5 once: its conditioning is kept
/// (T5-XXL is the largest model of the pipeline, and training encodes the same prompts at
/// every step).
pub struct T5Encoder {
    pub tokenizer: T5Tokenizer,
    pub text_encoder: T5EncoderModel,
    pub max_length: usize,
    cache: Mutex<HashMap<String, Conditioning>>,
    device: Device,
}

impl T5Encoder {
    /// PixArt's `_text_preprocessing` without caption cleaning: lower case, stripped.
    pub fn preprocess(text: &str) -> String {
        text.to_lowercase().trim().to_string()
    }

    /// The ids and mask `[1, L]` (u32, f32) of `text` after preprocessing.
    pub fn tokenize(&self, text: &str, device: &Device) -> Result<(Tensor, Tensor)> {
        let e = self
            .tokenizer
            .encode(&Self::preprocess(text), self.max_length)?;
        let n = e.ids.len();
        let mask: Vec<f32> = e.mask.iter().map(|&m| m as f32).collect();
        Ok((
            Tensor::from_vec(e.ids, (1, n), device)?,
            Tensor::from_vec(mask, (1, n), device)?,
        ))
    }
}

impl PromptEncoder for T5Encoder {
    /// `[1, L, D]` embeddings (every row, as T5 gives them with the mask) and the `[1, L]`
    /// mask.
    fn encode(&self, text: &str) -> Result<Conditioning> {
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(text).cloned()) {
            return Ok(c);
        }
        let (ids, mask) = self.tokenize(text, &self.device)?;
        let embeds = self.text_encoder.forward(&ids, Some(&mask))?;
        let c = Conditioning {
            mask: Some(mask.to_device(embeds.device())?),
            embeds,
            pooled: None,
        };
        if let Ok(mut m) = self.cache.lock() {
            m.insert(text.to_string(), c.clone());
        }
        Ok(c)
    }

    fn shape(&self) -> Shape {
        Shape {
            tokens: self.max_length,
            width: self.text_encoder.config().d_model,
            pooled: None,
            mask: true,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The transformer, whose learned variance (the output's second half) sampling leaves out.
pub struct PixArtDenoiser {
    pub transformer: PixArtTransformer2DModel,
    /// Pixels per latent (the VAE's): the 1024 model's resolution condition is the image's.
    pub vae_scale: usize,
}

impl Denoiser for PixArtDenoiser {
    fn forward(&self, x: &Tensor, t: f64, cond: &Conditioning, _: Branch) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let mask = cond.mask.as_ref().ok_or_else(|| {
            Error::Invalid(
                "PixArt's cross-attention needs the prompt's attention mask; this conditioning has none"
                    .into(),
            )
        })?;
        let resolution = Some((h * self.vae_scale, w * self.vae_scale));
        let out = self
            .transformer
            .forward(x, t, &cond.embeds, Some(mask), resolution)?;
        // Learned sigma: guidance acts on every channel alike, so the noise half alone is
        // what the sampler uses.
        Ok(if out.dim(1)? == c {
            out
        } else {
            out.narrow(1, 0, c)?
        })
    }

    fn latent_channels(&self) -> usize {
        self.transformer.config().in_channels
    }

    fn is_video(&self) -> bool {
        false
    }

    fn sample_size(&self) -> Option<usize> {
        Some(self.transformer.config().sample_size)
    }

    fn size_multiple(&self) -> usize {
        self.transformer.config().patch_size
    }

    fn defaults(&self) -> Defaults {
        DEFAULTS
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The roles of a `PixArtAlphaPipeline` folder. T5 stays in the dtype it is stored in where
/// that is half precision (T5-XXL is 19 GB in f32), else `dtype`.
pub fn load_folder(
    root: &Path,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<Roles> {
    if let Some(l) = loras.first() {
        return Err(Error::file(
            &l.file,
            "reneg merges LoRAs into UNet models; PixArt-α is a transformer: drop --lora",
        ));
    }
    let te_dir = root.join("text_encoder");
    let te_cfg = T5Config::load(&te_dir.join("config.json"))?;
    let mut te_w = load_weights(&te_dir, TRANSFORMERS_WEIGHTS, dtype, device)?;
    let stored = ["shared.weight", "encoder.embed_tokens.weight"]
        .iter()
        .find_map(|n| te_w.stored_tensor(n).ok())
        .map(|t| t.dtype());
    if let Some(half @ (DType::BF16 | DType::F16)) = stored {
        te_w = load_weights(&te_dir, TRANSFORMERS_WEIGHTS, half, device)?;
    }
    let text_encoder = T5EncoderModel::new(te_cfg, &Vb::new(te_w))?;
    let tokenizer = T5Tokenizer::from_dir(&root.join("tokenizer"))?;
    if tokenizer.vocab_size() > text_encoder.config().vocab_size {
        return Err(Error::file(
            root.join("tokenizer"),
            format!(
                "gives ids up to {}, past the T5 encoder's vocab_size {}",
                tokenizer.vocab_size(),
                text_encoder.config().vocab_size
            ),
        ));
    }
    let tr_dir = root.join("transformer");
    let cfg = PixArtConfig::load(&tr_dir.join("config.json"))?;
    if cfg.caption_channels != text_encoder.config().d_model {
        return Err(Error::file(
            tr_dir.join("config.json"),
            format!(
                "caption_channels {} does not match the T5 encoder's d_model {}",
                cfg.caption_channels,
                text_encoder.config().d_model
            ),
        ));
    }
    let transformer = PixArtTransformer2DModel::new(
        cfg,
        &Vb::new(load_weights(&tr_dir, DIFFUSERS_WEIGHTS, dtype, device)?),
    )?;
    let vae = super::sd::load_vae(&root.join("vae"), dtype, device)?;
    let vae_scale = vae.config().downscale();
    let encoder = T5Encoder {
        tokenizer,
        text_encoder,
        max_length: MAX_SEQUENCE_LENGTH,
        cache: Mutex::new(HashMap::new()),
        device: device.clone(),
    };
    let denoiser = PixArtDenoiser {
        transformer,
        vae_scale,
    };
    Ok((
        Box::new(encoder),
        Box::new(denoiser),
        Box::new(VaeDecoder::new(vae, dtype, device)),
    ))
}
