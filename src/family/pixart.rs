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
/// every step), and with a text cache ([`PromptEncoder::set_text_cache`]) written to a file
/// and read back by later runs. T5's weights are read on the first prompt that needs them, so
/// a run whose prompts are all cached never holds them.
pub struct T5Encoder {
    pub tokenizer: T5Tokenizer,
    pub config: T5Config,
    pub max_length: usize,
    /// Read on first use; let go once a run's prompts are all encoded
    /// ([`PromptEncoder::encode_ahead`]).
    model: Mutex<Option<std::sync::Arc<T5EncoderModel>>>,
    load: Box<dyn Fn() -> Result<T5EncoderModel> + Send + Sync>,
    /// What identifies the encoder in a cache file (its config and weights' sizes).
    fingerprint: String,
    /// Encodings by [`Self::key`] of their text.
    cache: Mutex<HashMap<String, Conditioning>>,
    cache_file: Option<std::path::PathBuf>,
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

    /// The encoder, read on first use (and again after [`PromptEncoder::encode_ahead`] let
    /// it go, for a text that was not encoded ahead).
    pub fn model(&self) -> Result<std::sync::Arc<T5EncoderModel>> {
        let mut slot = self.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        let m = std::sync::Arc::new((self.load)()?);
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Whether T5's weights are held (a run whose prompts are all cached never reads them; a
    /// run lets them go once its prompts are encoded).
    pub fn is_loaded(&self) -> bool {
        self.model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The cache file's key of `text`: what T5 is given (the preprocessed text) and the
    /// prompt length.
    fn key(&self, text: &str) -> String {
        use sha2::Digest;
        let digest =
            sha2::Sha256::digest(format!("{}\n{}", self.max_length, Self::preprocess(text)));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes every cached encoding to the cache file (atomically).
    fn save_cache(&self, file: &Path, cache: &HashMap<String, Conditioning>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (k, c) in cache {
            tensors.push((
                format!("{k}.embeds"),
                c.embeds.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            ));
            if let Some(m) = &c.mask {
                tensors.push((
                    format!("{k}.mask"),
                    m.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                ));
            }
        }
        let mut meta = HashMap::new();
        meta.insert("encoder".to_string(), self.fingerprint.clone());
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let bytes = crate::io::safetensors_f32(&refs, meta, "cannot write the text cache")
            .map_err(|e| Error::file(file, e.to_string()))?;
        crate::io::write_atomic(file, &bytes)
    }
}

impl PromptEncoder for T5Encoder {
    /// `[1, L, D]` embeddings (every row, as T5 gives them with the mask) and the `[1, L]`
    /// mask.
    fn encode(&self, text: &str) -> Result<Conditioning> {
        let key = self.key(text);
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let (ids, mask) = self.tokenize(text, &self.device)?;
        let embeds = self.model()?.forward(&ids, Some(&mask))?;
        let c = Conditioning {
            mask: Some(mask.to_device(embeds.device())?),
            embeds,
            pooled: None,
        };
        if let Ok(mut m) = self.cache.lock() {
            m.insert(key, c.clone());
            if let Some(f) = &self.cache_file {
                self.save_cache(f, &m)?;
            }
        }
        Ok(c)
    }

    /// Encodes each text not cached yet, then lets T5 go: T5-XXL (9.5 GB in bf16, 19 GB in
    /// f32) is not held through the sampling that follows.
    fn encode_ahead(&self, texts: &[&str]) -> Result<()> {
        for t in texts {
            self.encode(t)?;
        }
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            tokens: self.max_length,
            width: self.config.d_model,
            pooled: None,
            mask: true,
        }
    }

    /// Prompts of `tokens` tokens from now on (encodings of another length, cached or not, are
    /// kept apart: the length is part of their key).
    fn set_max_length(&mut self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(Error::Invalid(
                "--max-sequence-length 0: a prompt needs at least one token (its </s>)".into(),
            ));
        }
        self.max_length = tokens;
        Ok(())
    }

    /// Reads the encodings `file` holds (none when it does not exist yet); every new one is
    /// added to it. A file made by another encoder is refused by name.
    fn set_text_cache(&mut self, file: &Path) -> Result<()> {
        self.cache_file = Some(file.to_path_buf());
        if !file.exists() {
            return Ok(());
        }
        let bytes =
            std::fs::read(file).map_err(|e| Error::file(file, format!("cannot read: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::file(
                file,
                format!("not a text cache ({e}); delete it or name another file"),
            )
        })?;
        let made_by = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("encoder").cloned())
            .unwrap_or_default();
        if made_by != self.fingerprint {
            return Err(Error::file(
                file,
                "is a text cache of another text encoder (or max_length); delete it or name another file",
            ));
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &self.device)
            .map_err(|e| Error::file(file, format!("not a text cache ({e})")))?;
        let keys: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".embeds").map(str::to_string))
            .collect();
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Invalid("text cache lock poisoned".into()))?;
        for k in keys {
            let embeds = tensors.remove(&format!("{k}.embeds")).expect("listed");
            let mask = tensors.remove(&format!("{k}.mask")).ok_or_else(|| {
                Error::file(
                    file,
                    format!("the encoding {k} has no mask: not a text cache of reneg's"),
                )
            })?;
            // Any prompt length: encodings of other lengths are keyed apart (see `key`).
            let rows = embeds.dims().get(1).copied().unwrap_or(0);
            if embeds.dims() != [1, rows, self.config.d_model] || mask.dims() != [1, rows] {
                return Err(Error::file(
                    file,
                    format!(
                        "the encoding {k} is {:?}: not this encoder's",
                        embeds.dims()
                    ),
                ));
            }
            cache.insert(
                k,
                Conditioning {
                    embeds,
                    pooled: None,
                    mask: Some(mask),
                },
            );
        }
        Ok(())
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
    let tokenizer = T5Tokenizer::from_dir(&root.join("tokenizer"))?;
    if tokenizer.vocab_size() > te_cfg.vocab_size {
        return Err(Error::file(
            root.join("tokenizer"),
            format!(
                "gives ids up to {}, past the T5 encoder's vocab_size {}",
                tokenizer.vocab_size(),
                te_cfg.vocab_size
            ),
        ));
    }
    // The weights are checked (mapped, headers read) now and read on first use.
    let te_w = load_weights(&te_dir, TRANSFORMERS_WEIGHTS, dtype, device)?;
    let stored = ["shared.weight", "encoder.embed_tokens.weight"]
        .iter()
        .find_map(|n| te_w.stored_tensor(n).ok())
        .map(|t| t.dtype());
    drop(te_w);
    // T5 stays in its stored dtype where that is half precision.
    let te_dtype = match stored {
        Some(half @ (DType::BF16 | DType::F16)) => half,
        _ => dtype,
    };
    let fingerprint = format!(
        "{} {:?}",
        std::fs::read_to_string(te_dir.join("config.json"))
            .unwrap_or_default()
            .trim(),
        te_dtype
    );
    let load = {
        let (dir, cfg, dev) = (te_dir.clone(), te_cfg.clone(), device.clone());
        Box::new(move || {
            let w = load_weights(&dir, TRANSFORMERS_WEIGHTS, te_dtype, &dev)?;
            T5EncoderModel::new(cfg.clone(), &Vb::new(w))
        })
    };
    let tr_dir = root.join("transformer");
    let cfg = PixArtConfig::load(&tr_dir.join("config.json"))?;
    if cfg.caption_channels != te_cfg.d_model {
        return Err(Error::file(
            tr_dir.join("config.json"),
            format!(
                "caption_channels {} does not match the T5 encoder's d_model {}",
                cfg.caption_channels, te_cfg.d_model
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
        config: te_cfg,
        max_length: MAX_SEQUENCE_LENGTH,
        model: Mutex::new(None),
        load,
        fingerprint,
        cache: Mutex::new(HashMap::new()),
        cache_file: None,
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
