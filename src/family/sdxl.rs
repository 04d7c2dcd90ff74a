//! Stable Diffusion XL (diffusers' `StableDiffusionXLPipeline`): two CLIP text encoders whose
//! second-to-last hidden states are concatenated, the second's projected end-of-text state as
//! the pooled embedding; a `UNet2DConditionModel` with `text_time` added conditioning (the
//! pooled text and six size ids, [`crate::models::unet::TextTimeEmbedding`]); the VAE, decoded
//! in f32 where diffusers upcasts it. The negative is the pair (`negative_prompt_embeds`,
//! `negative_pooled_prompt_embeds`); without one the pipeline uses zeros when the folder says
//! `force_zeros_for_empty_prompt` (SDXL base does), else the encoding of "".

use super::clip_prompt::Chunk;
use super::roles::{Branch, Defaults, Denoiser, PromptEncoder, SizeConditioning};
use super::sd::{weights_file, VaeDecoder, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};
use super::Roles;
use crate::conditioning::{Conditioning, Shape};
use crate::embedding::textual_inversion::TextualInversion;
use crate::error::{read_json, Error, Result};
use crate::lora::{merge_all, Component};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::nn::Linear;
use crate::prompt_syntax::PromptSyntax;
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

/// Both tokenizers and text encoders, and `text_encoder_2`'s projection, with textual
/// inversions (`clip_l` vectors for the first encoder, `clip_g` for the second), clip skip
/// and A1111 prompt syntax over both encoders.
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
    /// How prompts are read (diffusers' way by default).
    pub prompt_syntax: PromptSyntax,
    /// Two-part textual-inversion embeddings prompts may use by name.
    pub textual_inversions: Vec<TextualInversion>,
    /// The empty prompt's `[1, 77, D1 + D2]` embeddings, made on first need to pad A1111's
    /// prompts of different chunk counts.
    empty_chunk: std::sync::OnceLock<Tensor>,
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
        self.encode_chunk(ids, &[], ids_2, ids_2, &[])
    }

    /// One chunk through both encoders: the concatenated hidden states (before emphasis) and
    /// the pooled embedding, read at the end-of-text row `pool_ids` locates.
    fn encode_chunk(
        &self,
        ids: &Tensor,
        overrides: &[(usize, Tensor)],
        ids_2: &Tensor,
        pool_ids: &Tensor,
        overrides_2: &[(usize, Tensor)],
    ) -> Result<Conditioning> {
        let (h1, _) = self.text_encoder.penultimate_and_last(ids, overrides)?;
        let (h2, last2) = self
            .text_encoder_2
            .penultimate_and_last(ids_2, overrides_2)?;
        let pooled = self.text_encoder_2.pooled(&last2, pool_ids)?;
        let pooled = self.text_projection.forward(&pooled)?;
        Ok(Conditioning {
            embeds: Tensor::cat(&[&h1, &h2.to_dtype(h1.dtype())?], 2)?,
            pooled: Some(pooled.to_dtype(h1.dtype())?),
            mask: None,
        })
    }

    /// The conditioning of `text`: each tokenizer's chunks ([`super::clip_prompt`]) through
    /// its encoder, emphasis applied to each encoder's output on its own, the two
    /// concatenated along the width and the chunks along the sequence (A1111's SDXL); the
    /// pooled embedding is the first chunk's.
    pub fn encode_prompt(&self, text: &str) -> Result<Conditioning> {
        use super::clip_prompt::{chunks, Encoding};
        let tis = &self.textual_inversions;
        let of = |tok: &ClipTokenizer| -> Result<Vec<Chunk>> {
            Ok(match chunks(text, tok, tis, self.prompt_syntax)? {
                Encoding::Plain => vec![Chunk::plain(tok.encode(text))],
                Encoding::Chunks(list) => list,
            })
        };
        let (list, list_2) = (of(&self.tokenizer)?, of(&self.tokenizer_2)?);
        if list.len() != list_2.len() {
            return Err(Error::Invalid(format!(
                "the two SDXL tokenizers cut the prompt {text:?} into {} and {} chunks: tokenizer and tokenizer_2 do not share a vocabulary",
                list.len(),
                list_2.len()
            )));
        }
        let mut embeds = Vec::with_capacity(list.len());
        let mut pooled = None;
        for (c, c2) in list.iter().zip(&list_2) {
            let ids_2 = c2.ids_tensor(&self.device)?;
            let pool_ids = match self.prompt_syntax {
                PromptSyntax::Plain => self.added_token_ids(c2)?,
                // A1111's placeholders are ordinary ids: the end-of-text token is the highest.
                PromptSyntax::A1111 => ids_2.clone(),
            };
            let cond = self.encode_chunk(
                &c.ids_tensor(&self.device)?,
                &c.overrides(|t| Some(&t.vectors), tis)?,
                &ids_2,
                &pool_ids,
                &c2.overrides(|t| t.vectors_2.as_ref(), tis)?,
            )?;
            let w1 = self.text_encoder.hidden_size();
            let h1 = c.emphasize(cond.embeds.narrow(2, 0, w1)?)?;
            let h2 = c2.emphasize(cond.embeds.narrow(2, w1, cond.embeds.dim(2)? - w1)?)?;
            embeds.push(Tensor::cat(&[&h1, &h2], 2)?);
            pooled.get_or_insert(cond.pooled);
        }
        Ok(Conditioning {
            embeds: Tensor::cat(&embeds, 1)?,
            pooled: pooled.flatten(),
            mask: None,
        })
    }

    /// `chunk`'s ids as diffusers has them after `load_textual_inversion`: each inversion's
    /// vectors are tokens added past the vocabulary, in the order the inversions were loaded.
    /// A text encoder whose config has the legacy `eos_token_id` 2 pools at the highest id,
    /// which is then an inversion's last vector, not the end of text: diffusers' pooled
    /// embedding of a prompt naming an inversion comes from that row, and so does reneg's.
    fn added_token_ids(&self, chunk: &Chunk) -> Result<Tensor> {
        let vocab = self.text_encoder_2.config().vocab_size as u32;
        let mut ids = chunk.ids.clone();
        for &(pos, j, k) in &chunk.vectors {
            let before: usize = self.textual_inversions[..j].iter().map(|t| t.len()).sum();
            ids[pos] = vocab + (before + k) as u32;
        }
        Ok(Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?)
    }
}

impl PromptEncoder for SdxlEncoder {
    fn encode(&self, text: &str) -> Result<Conditioning> {
        self.encode_prompt(text)
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

    /// A1111's longer prompts are padded with the empty prompt's chunks to one length; the
    /// pooled embeddings are the first chunks' already.
    fn batch(&self, conds: &[&Conditioning]) -> Result<Conditioning> {
        let embeds: Vec<&Tensor> = conds.iter().map(|c| &c.embeds).collect();
        let embeds = super::clip_prompt::pad_and_cat(&embeds, || {
            if let Some(e) = self.empty_chunk.get() {
                return Ok(e.clone());
            }
            let (a, b) = self.token_ids("")?;
            let e = self.encode_ids(&a, &b)?.embeds;
            Ok(self.empty_chunk.get_or_init(|| e).clone())
        })?;
        let pooled = conds
            .iter()
            .map(|c| c.pooled.as_ref())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Invalid("an SDXL conditioning without its pooled part".into()))?;
        Ok(Conditioning {
            embeds,
            pooled: Some(Tensor::cat(&pooled, 0)?),
            mask: None,
        })
    }

    fn shape(&self) -> Shape {
        Shape {
            tokens: self.tokenizer.max_len(),
            width: self.text_encoder.hidden_size() + self.text_encoder_2.hidden_size(),
            pooled: Some(self.pooled_dim),
            mask: false,
        }
    }

    fn check_prompt(&self, text: &str) -> Result<()> {
        super::clip_prompt::check(text, &self.textual_inversions)
    }

    /// Two-part embeddings only, each part as wide as its encoder; replaces one of the same
    /// name.
    fn add_textual_inversion(&mut self, ti: TextualInversion, path: &Path) -> Result<()> {
        let (w1, w2) = (
            self.text_encoder.hidden_size(),
            self.text_encoder_2.hidden_size(),
        );
        let Some(g) = &ti.vectors_2 else {
            return Err(Error::file(
                path,
                format!(
                    "holds one set of {}-wide vectors (an SD 1.x/2.x embedding); SDXL takes an embedding with clip_l ({w1}) and clip_g ({w2}) parts",
                    ti.width()
                ),
            ));
        };
        let (l_w, g_w) = (ti.width(), g.dim(1)?);
        if (l_w, g_w) != (w1, w2) {
            return Err(Error::file(
                path,
                format!("clip_l and clip_g vectors of widths {l_w} and {g_w}; this model's text encoders take {w1} and {w2}"),
            ));
        }
        self.textual_inversions.retain(|t| t.name != ti.name);
        self.textual_inversions.push(ti);
        Ok(())
    }

    /// diffusers' SDXL `clip_skip`: both encoders read `hidden_states[-(skip + 2)]`.
    fn set_clip_skip(&mut self, skip: usize) -> Result<()> {
        self.text_encoder.set_clip_skip(skip)?;
        self.text_encoder_2.set_clip_skip(skip)?;
        self.empty_chunk = std::sync::OnceLock::new();
        Ok(())
    }

    fn set_prompt_syntax(&mut self, syntax: PromptSyntax) -> Result<()> {
        self.prompt_syntax = syntax;
        Ok(())
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
        prompt_syntax: PromptSyntax::default(),
        textual_inversions: Vec::new(),
        empty_chunk: std::sync::OnceLock::new(),
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

/// The roles of a `StableDiffusionXLPipeline` folder.
pub fn load_folder(
    root: &Path,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
) -> Result<Roles> {
    let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
    let force_zeros = index
        .get("force_zeros_for_empty_prompt")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let te2_dir = root.join("text_encoder_2");
    if !te2_dir.is_dir() {
        return Err(Error::file(
            root,
            "an SDXL folder needs text_encoder_2/ (the OpenCLIP bigG encoder)",
        ));
    }
    let (te_dir, unet_dir) = (root.join("text_encoder"), root.join("unet"));
    let load = |dir: &Path, names: &[&str], dtype| {
        Weights::load(&weights_file(dir, names)?, dtype, device)
    };
    let mut te_w = load(&te_dir, TRANSFORMERS_WEIGHTS, dtype)?;
    let mut te2_w = load(&te2_dir, TRANSFORMERS_WEIGHTS, dtype)?;
    let mut unet_w = load(&unet_dir, DIFFUSERS_WEIGHTS, dtype)?;
    merge_all(
        loras,
        &mut [
            (Component::TextEncoder, &mut te_w),
            (Component::TextEncoder2, &mut te2_w),
            (Component::Unet, &mut unet_w),
        ],
    )?;
    let text_encoder = ClipTextModel::new(
        ClipTextConfig::load(&te_dir.join("config.json"))?,
        &Vb::new(te_w),
    )?;
    let vb2 = Vb::new(te2_w);
    let text_encoder_2 =
        ClipTextModel::new(ClipTextConfig::load(&te2_dir.join("config.json"))?, &vb2)?;
    let cfg2: serde_json::Value = read_json(&te2_dir.join("config.json"))?;
    let projection = projection(&text_encoder_2, &cfg2, &vb2, &te2_dir.join("config.json"))?;
    let unet = UNet2DConditionModel::new(
        UNetConfig::load(&unet_dir.join("config.json"))?,
        &Vb::new(unet_w),
    )?;
    let vae_dir = root.join("vae");
    let vd = vae_dtype(&read_json(&vae_dir.join("config.json"))?, dtype);
    let vae = AutoencoderKL::new(
        VaeConfig::load(&vae_dir.join("config.json"))?,
        &Vb::new(load(&vae_dir, DIFFUSERS_WEIGHTS, vd)?),
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
    let mut c = crate::single_file::convert_sdxl(&all, path, overrides)?;
    drop(all);
    merge_all(
        loras,
        &mut [
            (Component::TextEncoder, &mut c.text_encoder),
            (Component::TextEncoder2, &mut c.text_encoder_2),
            (Component::Unet, &mut c.unet),
        ],
    )?;
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
