//! Stable Diffusion 1.x/2.x (diffusers' `StableDiffusionPipeline`, its ControlNet and img2img
//! variants, and original single files): the CLIP text encoder with textual inversions, clip
//! skip and A1111 prompt syntax; the `UNet2DConditionModel` fed by ControlNets; the
//! `AutoencoderKL` decoder. ModelScope/ZeroScope ([`super::video_sd`]) reuse all three with a
//! `UNet3DConditionModel`.

use super::roles::{Branch, Decoder, Defaults, Denoiser, PromptEncoder};
use crate::conditioning::{Conditioning, Shape};
use crate::control::Control;
use crate::embedding::textual_inversion::TextualInversion;
use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{Residuals, UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::prompt_syntax::PromptSyntax;
use crate::tokenizer::ClipTokenizer;
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor};
use std::any::Any;
use std::path::{Path, PathBuf};

/// Finds a component's weights: the safetensors names diffusers and transformers write.
pub fn weights_file(dir: &Path, candidates: &[&str]) -> Result<PathBuf> {
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::file(
                dir,
                format!(
                    "no weights found (looked for {}); save the pipeline with safe_serialization=True",
                    candidates.join(", ")
                ),
            )
        })
}

/// A component's weights: one of `candidates`, or a sharded checkpoint's index beside them
/// (`<candidate>.index.json`, as T5-XXL ships in PixArt's folders; the fp16 variant's
/// `model.safetensors.index.fp16.json`).
pub fn load_weights(
    dir: &Path,
    candidates: &[&str],
    dtype: DType,
    device: &Device,
) -> Result<Weights> {
    if let Some(index) = candidates
        .iter()
        .filter(|c| !dir.join(c).is_file())
        .map(|c| match c.strip_suffix(".fp16.safetensors") {
            Some(stem) => dir.join(format!("{stem}.safetensors.index.fp16.json")),
            None => dir.join(format!("{c}.index.json")),
        })
        .find(|p| p.is_file())
    {
        return Weights::load_sharded(&index, dtype, device);
    }
    Weights::load(&weights_file(dir, candidates)?, dtype, device)
}

pub const DIFFUSERS_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
pub const TRANSFORMERS_WEIGHTS: &[&str] = &["model.safetensors", "model.fp16.safetensors"];

/// A diffusers `AutoencoderKL` folder (`config.json` and its weights).
pub fn load_vae(dir: &Path, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "VAE folder not found"));
    }
    let cfg = VaeConfig::load(&dir.join("config.json"))?;
    let vb = Vb::new(Weights::load(
        &weights_file(dir, DIFFUSERS_WEIGHTS)?,
        dtype,
        device,
    )?);
    AutoencoderKL::new(cfg, &vb)
}

/// The three roles of a diffusers SD (or text-to-video SD) folder: tokenizer and text encoder,
/// UNet, VAE, with LoRAs merged into the UNet's and the text encoder's weights.
pub fn load_folder(
    root: &Path,
    dtype: DType,
    device: &Device,
    loras: &[crate::lora::Lora],
    family: Option<super::Family>,
) -> Result<(ClipEncoder, UnetDenoiser, VaeDecoder)> {
    use crate::lora::{merge_all, Component};
    let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;

    let te_dir = root.join("text_encoder");
    let te_cfg = ClipTextConfig::load(&te_dir.join("config.json"))?;
    let mut te_w = Weights::load(&weights_file(&te_dir, TRANSFORMERS_WEIGHTS)?, dtype, device)?;
    let unet_dir = root.join("unet");
    let unet_cfg = UNetConfig::load(&unet_dir.join("config.json"))?;
    let mut unet_w = Weights::load(&weights_file(&unet_dir, DIFFUSERS_WEIGHTS)?, dtype, device)?;
    merge_all(
        loras,
        &mut [
            (Component::TextEncoder, &mut te_w),
            (Component::Unet, &mut unet_w),
        ],
    )?;
    let text_encoder = ClipTextModel::new(te_cfg, &Vb::new(te_w))?;

    if let Some(f) = family {
        f.check_unet(root, unet_cfg.video)?;
    }
    if unet_cfg.addition_embed_type.is_some() {
        return Err(Error::file(
            &unet_dir,
            "is an SDXL UNet (addition_embed_type text_time); its folder's model_index.json should name StableDiffusionXLPipeline",
        ));
    }
    let unet = UNet2DConditionModel::new(unet_cfg, &Vb::new(unet_w))?;
    let vae = load_vae(&root.join("vae"), dtype, device)?;
    roles(tokenizer, text_encoder, unet, vae, root, dtype, device)
}

/// The roles from loaded models, checking that they fit one another.
pub fn roles(
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    root: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ClipEncoder, UnetDenoiser, VaeDecoder)> {
    let (te, ctx) = (text_encoder.hidden_size(), unet.config().context_dim());
    if te != ctx {
        return Err(Error::file(
            root,
            format!("text encoder width {te} does not match the UNet's cross_attention_dim {ctx}"),
        ));
    }
    let (have, want) = (vae.config().latent_channels, unet.config().in_channels);
    if have != want {
        return Err(Error::file(
            root,
            format!("a VAE with {have} latent channels; the UNet takes {want}"),
        ));
    }
    Ok((
        ClipEncoder {
            tokenizer,
            text_encoder,
            prompt_syntax: PromptSyntax::default(),
            textual_inversions: Vec::new(),
            empty_chunk: std::sync::OnceLock::new(),
            device: device.clone(),
        },
        UnetDenoiser {
            unet,
            controls: Vec::new(),
            guess_mode: false,
            frame_rate: None,
            defaults: Defaults::default(),
        },
        VaeDecoder {
            vae,
            dtype,
            device: device.clone(),
        },
    ))
}

/// CLIP's tokenizer and text encoder (the last hidden state, or an earlier layer with clip
/// skip), with textual inversions and A1111 prompt syntax.
pub struct ClipEncoder {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// How prompts are read (diffusers' way by default).
    pub prompt_syntax: PromptSyntax,
    /// Textual-inversion embeddings prompts may use by name.
    pub textual_inversions: Vec<TextualInversion>,
    /// The empty prompt's encoding, made once on first need: [`Self::cat_contexts`] pads
    /// with it at every sampling step.
    empty_chunk: std::sync::OnceLock<Tensor>,
    device: Device,
}

impl ClipEncoder {
    /// Token ids, `[1, 77]` u32.
    pub fn tokenize(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text);
        Ok(Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?)
    }

    /// The text encoder's last hidden state for `text`: `[1, 77 k, embed_dim]`.
    ///
    /// With the default [`PromptSyntax::Plain`](crate::prompt_syntax::PromptSyntax) k = 1:
    /// the text is encoded as diffusers encodes it, its tokens past 75 cut off. With
    /// `A1111`, as AUTOMATIC1111 does, a longer prompt is cut into chunks of 75 tokens (at the
    /// last comma if one is within the last 20), each encoded as a prompt of its own and
    /// concatenated; `BREAK` starts a new chunk; the emphasis (`(word:1.3)`, `(word)`,
    /// `[word]`) scales each token's output and then the chunk back to its mean. Either way
    /// names of textual-inversion embeddings take their vectors' places, and a text without
    /// syntax, names or more than 75 tokens is encoded exactly as transformers does.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor> {
        use super::clip_prompt::{chunks, Encoding};
        let list = match chunks(
            text,
            &self.tokenizer,
            &self.textual_inversions,
            self.prompt_syntax,
        )? {
            Encoding::Plain => return self.text_encoder.forward(&self.tokenize(text)?),
            Encoding::Chunks(list) => list,
        };
        let mut outs = Vec::with_capacity(list.len());
        for chunk in &list {
            let overrides = chunk.overrides(|t| Some(&t.vectors), &self.textual_inversions)?;
            let z = self
                .text_encoder
                .forward_with_token_embeddings(&chunk.ids_tensor(&self.device)?, &overrides)?;
            outs.push(chunk.emphasize(z)?);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// Prompt embeddings of different lengths (chunk counts, [`Self::encode_prompt`]) made
    /// equal by appending the empty prompt's chunk to the shorter ones, as A1111 pads the
    /// shorter of prompt and negative, and concatenated along the batch: `[sum b_i, L, D]`.
    pub fn cat_contexts(&self, contexts: &[&Tensor]) -> Result<Tensor> {
        super::clip_prompt::pad_and_cat(contexts, || {
            if let Some(e) = self.empty_chunk.get() {
                return Ok(e.clone());
            }
            let e = self.text_encoder.forward(&self.tokenize("")?)?;
            Ok(self.empty_chunk.get_or_init(|| e).clone())
        })
    }
}

impl PromptEncoder for ClipEncoder {
    fn encode(&self, text: &str) -> Result<Conditioning> {
        Ok(self.encode_prompt(text)?.into())
    }

    /// A1111's longer prompts are padded with the empty prompt's chunks to one length.
    fn batch(&self, conds: &[&Conditioning]) -> Result<Conditioning> {
        let embeds: Vec<&Tensor> = conds.iter().map(|c| &c.embeds).collect();
        Ok(self.cat_contexts(&embeds)?.into())
    }

    fn shape(&self) -> Shape {
        Shape {
            tokens: self.tokenizer.max_len(),
            width: self.text_encoder.hidden_size(),
            pooled: None,
            mask: false,
        }
    }

    fn check_prompt(&self, text: &str) -> Result<()> {
        super::clip_prompt::check(text, &self.textual_inversions)
    }

    /// Replaces one of the same name; refuses vectors of another width (another family's).
    fn add_textual_inversion(&mut self, ti: TextualInversion, path: &Path) -> Result<()> {
        if ti.vectors_2.is_some() {
            return Err(Error::file(
                path,
                "is an SDXL embedding (clip_l and clip_g parts); this model has one text encoder",
            ));
        }
        let width = self.text_encoder.hidden_size();
        if ti.width() != width {
            return Err(Error::file(
                path,
                format!(
                    "textual-inversion vectors of width {}, but this model's text encoder takes {width} (an embedding for another model family)",
                    ti.width()
                ),
            ));
        }
        self.textual_inversions.retain(|t| t.name != ti.name);
        self.textual_inversions.push(ti);
        Ok(())
    }

    /// The cached empty-prompt chunk follows the new layer.
    fn set_clip_skip(&mut self, skip: usize) -> Result<()> {
        self.text_encoder.set_clip_skip(skip)?;
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

/// The UNet (2D, or 3D for text-to-video) with the ControlNets that feed it.
pub struct UnetDenoiser {
    pub unet: UNet2DConditionModel,
    /// ControlNets with their conditioning images.
    pub controls: Vec<Control>,
    /// diffusers' guess mode: ControlNets act on the prompt's branch only (the negative's gets
    /// no residuals), their residuals scaled from 0.1 at the shallowest skip to 1 at the mid.
    pub guess_mode: bool,
    /// lvdm's frame-rate conditioning (VideoCrafter2), when the UNet has it.
    pub frame_rate: Option<FrameRate>,
    pub defaults: Defaults,
}

/// lvdm's `fps_embedding`: the frame rate through the timestep's sinusoid and an MLP of its
/// own (Linear, SiLU, Linear), added to the time embedding. Both guidance branches get the
/// same rate, as lvdm's sampler passes them.
pub struct FrameRate {
    pub linear_1: crate::nn::linear::Linear,
    pub linear_2: crate::nn::linear::Linear,
    pub fps: f64,
}

impl FrameRate {
    /// `fps_embedding.linear_{1,2}` under `vb`, for a UNet of `c0` base channels.
    pub fn new(c0: usize, fps: f64, vb: &Vb) -> Result<Self> {
        use crate::nn::linear::Linear;
        Ok(Self {
            linear_1: Linear::new(c0, 4 * c0, true, &vb.pp("linear_1"))?,
            linear_2: Linear::new(4 * c0, 4 * c0, true, &vb.pp("linear_2"))?,
            fps,
        })
    }

    /// The embedding `[b, 4 * c0]` of this rate for `b` rows.
    pub fn embed(&self, b: usize, c0: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
        let f = crate::models::unet::sinusoid(&vec![self.fps; b], c0, true, 0.0, dtype, dev)?;
        Ok(self.linear_2.forward(&self.linear_1.forward(&f)?.silu()?)?)
    }
}

impl UnetDenoiser {
    /// The summed residuals of every ControlNet for latents `x` `[b, ...]` with context `ctx`.
    pub fn control_residuals(&self, x: &Tensor, t: f64, ctx: &Tensor) -> Result<Residuals> {
        let b = x.dim(0)?;
        let mut sum: Option<Residuals> = None;
        for c in &self.controls {
            let (_, ch, h, w) = c.image.dims4()?;
            let image = c
                .image
                .to_dtype(x.dtype())?
                .to_device(x.device())?
                .broadcast_as((b, ch, h, w))?;
            let r = c
                .model
                .forward(x, t, ctx, &image, c.scale, self.guess_mode)
                .map_err(|e| Error::file(&c.source, e.to_string()))?;
            sum = Some(match sum {
                None => r,
                Some(s) => s.add(&r)?,
            });
        }
        sum.ok_or_else(|| Error::Invalid("no ControlNet to run".into()))
    }
}

impl Denoiser for UnetDenoiser {
    fn forward(&self, x: &Tensor, t: f64, cond: &Conditioning, branch: Branch) -> Result<Tensor> {
        let ctx = &cond.embeds;
        if let Some(rate) = &self.frame_rate {
            let b = x.dim(0)?;
            let c0 = self.unet.config().block_out_channels[0];
            let added = rate.embed(b, c0, x.dtype(), x.device())?;
            return self.unet.forward_added(x, &vec![t; b], ctx, &added);
        }
        if self.controls.is_empty() {
            return self.unet.forward(x, t, ctx);
        }
        let b = x.dim(0)?;
        let residuals = match (branch, self.guess_mode) {
            (Branch::Negative, true) => None,
            (Branch::Both, true) => {
                // diffusers: the ControlNets see the prompt's half; the negative's gets zeros.
                let h = b / 2;
                let r = self.control_residuals(&x.narrow(0, h, h)?, t, &ctx.narrow(0, h, h)?)?;
                Some(Residuals::cat(&[&r.zeros_like()?, &r])?)
            }
            _ => Some(self.control_residuals(x, t, ctx)?),
        };
        self.unet
            .forward_with(x, &vec![t; b], ctx, residuals.as_ref())
    }

    fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    fn is_video(&self) -> bool {
        self.unet.config().video
    }

    fn sample_size(&self) -> Option<usize> {
        self.unet.config().sample_size
    }

    fn size_multiple(&self) -> usize {
        1 << self.unet.config().downsamplings()
    }

    fn set_checkpointing(&mut self, on: bool) {
        self.unet.set_checkpointing(on);
    }

    fn defaults(&self) -> Defaults {
        self.defaults
    }

    fn frame_rate(&self) -> Option<f64> {
        self.frame_rate.as_ref().map(|r| r.fps)
    }

    fn set_frame_rate(&mut self, fps: f64) -> Result<()> {
        match &mut self.frame_rate {
            Some(r) => {
                r.fps = fps;
                Ok(())
            }
            None => Err(super::roles::unsupported("frame-rate conditioning")),
        }
    }

    fn graph_elems(&self, h: u64, w: u64) -> Option<(u64, u64)> {
        Some(crate::train::memory::unet_graph_elems(
            self.unet.config(),
            h,
            w,
        ))
    }

    /// Refuses one whose residuals would not fit this UNet (another model family, or another
    /// architecture), naming `source`.
    fn add_controlnet(
        &mut self,
        model: crate::models::controlnet::ControlNetModel,
        image: Tensor,
        scale: f64,
        source: &Path,
    ) -> Result<()> {
        if self.is_video() {
            return Err(Error::file(
                source,
                "ControlNets work with image models; this model makes videos",
            ));
        }
        let (mine, theirs) = (self.unet.config(), &model.config().unet);
        let refuse = |what: &str, a: String, b: String| {
            Err(Error::file(
                source,
                format!(
                    "this ControlNet's {what} is {b}, the UNet's {a}: a ControlNet for another model"
                ),
            ))
        };
        if mine.context_dim() != theirs.context_dim() {
            return refuse(
                "cross_attention_dim",
                mine.context_dim().to_string(),
                theirs.context_dim().to_string(),
            );
        }
        if mine.block_out_channels != theirs.block_out_channels
            || mine.layers_per_level()? != theirs.layers_per_level()?
        {
            return refuse(
                "block_out_channels / layers_per_block",
                format!(
                    "{:?} / {:?}",
                    mine.block_out_channels,
                    mine.layers_per_level()?
                ),
                format!(
                    "{:?} / {:?}",
                    theirs.block_out_channels,
                    theirs.layers_per_level()?
                ),
            );
        }
        if image.rank() != 4 || image.dim(1)? != model.config().conditioning_channels {
            return Err(Error::Invalid(format!(
                "control image for {}: shape {:?}, needs [1, {}, H, W]",
                source.display(),
                image.dims(),
                model.config().conditioning_channels
            )));
        }
        self.controls.push(Control {
            model,
            image,
            scale,
            source: source.to_path_buf(),
        });
        Ok(())
    }

    fn set_guess_mode(&mut self, on: bool) -> Result<()> {
        self.guess_mode = on;
        Ok(())
    }

    fn controls(&self) -> &[Control] {
        &self.controls
    }

    fn controls_mut(&mut self) -> &mut [Control] {
        &mut self.controls
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The `AutoencoderKL`'s decoder.
pub struct VaeDecoder {
    pub vae: AutoencoderKL,
    /// The weights' dtype and device (a replacement VAE is loaded alike).
    dtype: DType,
    device: Device,
}

impl VaeDecoder {
    /// A decoder of `vae`, whose weights are `dtype` on `device`.
    pub fn new(vae: AutoencoderKL, dtype: DType, device: &Device) -> Self {
        Self {
            vae,
            dtype,
            device: device.clone(),
        }
    }
}

impl Decoder for VaeDecoder {
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&(latents / self.vae.scaling_factor())?)
    }

    fn scale(&self) -> usize {
        self.vae.config().downscale()
    }

    fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    fn set_checkpointing(&mut self, on: bool) {
        self.vae.set_checkpointing(on);
    }

    fn graph_elems(&self, h: u64, w: u64) -> Option<(u64, u64)> {
        Some(crate::train::memory::vae_graph_elems(
            self.vae.config(),
            h,
            w,
        ))
    }

    /// A fine-tuned decoder such as sd-vae-ft-mse, which must share the latent channels.
    fn replace(&mut self, dir: &Path) -> Result<()> {
        let vae = load_vae(dir, self.dtype, &self.device)?;
        let (have, want) = (vae.config().latent_channels, self.latent_channels());
        if have != want {
            return Err(Error::file(
                dir,
                format!("a VAE with {have} latent channels; this model's UNet takes {want}"),
            ));
        }
        self.vae = vae;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl crate::Pipeline {
    /// An SD pipeline of loaded models (single files; tests that build one in memory).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: crate::scheduler::SchedulerConfig,
        root: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (e, d, v) = roles(tokenizer, text_encoder, unet, vae, root, dtype, device)?;
        Self::from_roles(
            (Box::new(e), Box::new(d), Box::new(v)),
            scheduler,
            root,
            dtype,
            device,
        )
    }

    /// The CLIP encoder of an SD-family pipeline (for checks of one model on its own).
    pub fn clip(&self) -> Result<&ClipEncoder> {
        self.encoder
            .as_any()
            .downcast_ref()
            .ok_or_else(|| not_sd(&self.root, "CLIP text encoder"))
    }

    /// The UNet of an SD-family pipeline.
    pub fn unet(&self) -> Result<&UNet2DConditionModel> {
        self.denoiser
            .as_any()
            .downcast_ref::<UnetDenoiser>()
            .map(|d| &d.unet)
            .ok_or_else(|| not_sd(&self.root, "UNet"))
    }

    /// The VAE of an SD-family pipeline.
    pub fn vae(&self) -> Result<&AutoencoderKL> {
        self.decoder
            .as_any()
            .downcast_ref::<VaeDecoder>()
            .map(|d| &d.vae)
            .ok_or_else(|| not_sd(&self.root, "AutoencoderKL"))
    }
}

fn not_sd(root: &Path, what: &str) -> Error {
    Error::file(root, format!("has no SD-family {what}"))
}
