//! A loaded Stable Diffusion 1.x/2.x text-to-image model (diffusers' `StableDiffusionPipeline`
//! folder layout): prompt encoding, classifier-free guided DDIM sampling, decoding, and the
//! one guided step through which ReNeg's gradient reaches the negative embedding.

use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::Residuals;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: Scheduler,
    /// Set when the model's scheduler config names a sampler reneg stands another in for.
    pub scheduler_note: Option<String>,
    pub root: PathBuf,
    /// How prompts are read ([`crate::prompt_syntax::PromptSyntax`]; diffusers' way by default).
    pub prompt_syntax: crate::prompt_syntax::PromptSyntax,
    /// Textual-inversion embeddings prompts may use by name ([`Self::add_textual_inversion`]).
    pub textual_inversions: Vec<crate::embedding::textual_inversion::TextualInversion>,
    /// ControlNets with their conditioning images ([`Self::add_controlnet`]).
    pub controls: Vec<crate::control::Control>,
    /// diffusers' guess mode: ControlNets act on the prompt's branch only (the negative's gets
    /// no residuals), their residuals scaled from 0.1 at the shallowest skip to 1 at the mid.
    pub guess_mode: bool,
    /// diffusers' `guidance_rescale` (0: plain classifier-free guidance; [`crate::guidance`]).
    pub guidance_rescale: f64,
    /// The empty prompt's encoding, made once on first need: [`Self::cat_contexts`] pads
    /// with it at every sampling step.
    empty_chunk: std::sync::OnceLock<Tensor>,
    dtype: DType,
    device: Device,
}

/// Finds a component's weights: the safetensors names diffusers and transformers write.
fn weights_file(dir: &Path, candidates: &[&str]) -> Result<PathBuf> {
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

const DIFFUSERS_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
const TRANSFORMERS_WEIGHTS: &[&str] = &["model.safetensors", "model.fp16.safetensors"];

/// A diffusers `AutoencoderKL` folder (`config.json` and its weights).
fn load_vae(dir: &Path, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
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

impl StableDiffusion {
    /// Loads a diffusers pipeline folder (with `model_index.json`).
    pub fn load(root: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_loras(root, dtype, device, &[])
    }

    /// [`Self::load`] with LoRAs merged into the UNet's and the text encoder's weights.
    pub fn load_with_loras(
        root: &Path,
        dtype: DType,
        device: &Device,
        loras: &[crate::lora::Lora],
    ) -> Result<Self> {
        use crate::lora::{merge_all, Component};
        if !root.is_dir() {
            return Err(Error::file(root, "model folder not found"));
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::file(
                root,
                "not a diffusers pipeline folder (no model_index.json); pass the folder saved by save_pretrained",
            ));
        }
        // The family is decided before any weight is read: a pipeline reneg does not run is
        // refused by its class name.
        let family = crate::family::Family::of_folder(root)?;

        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;

        let te_dir = root.join("text_encoder");
        let te_cfg = ClipTextConfig::load(&te_dir.join("config.json"))?;
        let mut te_w = Weights::load(&weights_file(&te_dir, TRANSFORMERS_WEIGHTS)?, dtype, device)?;
        merge_all(loras, Component::TextEncoder, &mut te_w)?;
        let te_vb = Vb::new(te_w);
        let text_encoder = ClipTextModel::new(te_cfg, &te_vb)?;

        let unet_dir = root.join("unet");
        let unet_cfg = UNetConfig::load(&unet_dir.join("config.json"))?;
        let mut unet_w =
            Weights::load(&weights_file(&unet_dir, DIFFUSERS_WEIGHTS)?, dtype, device)?;
        merge_all(loras, Component::Unet, &mut unet_w)?;
        let unet_vb = Vb::new(unet_w);
        if let Some(f) = family {
            f.check_unet(root, unet_cfg.video)?;
        }
        let unet = UNet2DConditionModel::new(unet_cfg, &unet_vb)?;

        let vae = load_vae(&root.join("vae"), dtype, device)?;

        let scheduler = SchedulerConfig::load(&root.join("scheduler/scheduler_config.json"))?;

        Self::from_parts(
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            root,
            dtype,
            device,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: SchedulerConfig,
        root: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (te, ctx) = (text_encoder.hidden_size(), unet.config().context_dim());
        if te != ctx {
            return Err(Error::file(
                root,
                format!(
                    "text encoder width {te} does not match the UNet's cross_attention_dim {ctx}"
                ),
            ));
        }
        let (scheduler, scheduler_note) = Scheduler::from_config(scheduler)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            scheduler_note,
            root: root.to_path_buf(),
            textual_inversions: Vec::new(),
            prompt_syntax: Default::default(),
            controls: Vec::new(),
            guess_mode: false,
            guidance_rescale: 0.0,
            empty_chunk: std::sync::OnceLock::new(),
            dtype,
            device: device.clone(),
        })
    }

    /// The dtype of what passes between the models (latents, prompt embeddings, pixels): the
    /// weights' dtype, or f32 for bf16/fp16 weights (autocast; see `crate::precision`).
    pub fn dtype(&self) -> DType {
        crate::precision::activation_dtype(self.dtype)
    }

    /// The dtype the weights are stored and multiplied in.
    pub fn weight_dtype(&self) -> DType {
        self.dtype
    }

    /// Activation checkpointing of the UNet's layers and the VAE decoder's blocks on the
    /// gradient path (same gradients, less memory, one more forward of each in the backward).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.unet.set_checkpointing(on);
        self.vae.set_checkpointing(on);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Width of the text embeddings (768 for SD1.x, 1024 for SD2.x).
    pub fn embed_dim(&self) -> usize {
        self.text_encoder.hidden_size()
    }

    /// Pixels per latent along a side.
    pub fn vae_scale(&self) -> usize {
        self.vae.config().downscale()
    }

    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

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
        use crate::embedding::textual_inversion::{split, Piece};
        use crate::prompt_syntax::{is_plain, parse, Part, PromptSyntax};
        let a1111 = self.prompt_syntax == PromptSyntax::A1111;
        let names: Vec<&str> = self
            .textual_inversions
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let tok = &self.tokenizer;
        let chunk_len = tok.max_len() - 2;
        // Split even without embeddings loaded: `embedding:NAME` must name a loaded one.
        let has_names = split(text, &names)
            .map_err(Error::Invalid)?
            .iter()
            .any(|p| matches!(p, Piece::Embedding(_)));
        if !has_names && (!a1111 || (is_plain(text) && tok.tokens(text).len() <= chunk_len)) {
            return self.text_encoder.forward(&self.tokenize(text)?);
        }
        let parts = if a1111 {
            parse(text)
        } else {
            vec![Part::Text(text.to_string(), 1.0)]
        };
        // Tokens with their weights and (for embeddings) vectors; None marks BREAK.
        let mut items: Vec<Option<(u32, f64, Option<Tensor>)>> = Vec::new();
        for part in parts {
            match part {
                Part::Break => items.push(None),
                Part::Text(t, w) => {
                    for piece in split(&t, &names).map_err(Error::Invalid)? {
                        match piece {
                            Piece::Text(t) => items
                                .extend(tok.tokens(t).into_iter().map(|id| Some((id, w, None)))),
                            Piece::Embedding(j) => {
                                let ti = &self.textual_inversions[j];
                                for k in 0..ti.len() {
                                    // A placeholder id; its input embedding is replaced.
                                    items.push(Some((tok.bos_id(), w, Some(ti.vectors.get(k)?))));
                                }
                            }
                        }
                    }
                }
            }
        }
        let chunks = if a1111 {
            chunk_tokens(items, chunk_len, tok.tokens(",").first().copied())
        } else {
            // One chunk, cut at 75 tokens as the tokenizer cuts a plain prompt.
            vec![items.into_iter().flatten().take(chunk_len).collect()]
        };
        let mut outs = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let mut ids = vec![tok.bos_id()];
            let mut weights = vec![1f32];
            let mut overrides: Vec<(usize, Tensor)> = Vec::new();
            for (id, w, v) in chunk {
                if let Some(v) = v {
                    overrides.push((ids.len(), v));
                }
                ids.push(id);
                weights.push(w as f32);
            }
            ids.push(tok.eos_id());
            ids.resize(tok.max_len(), tok.pad_id());
            weights.resize(tok.max_len(), 1.0);
            let n = ids.len();
            let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
            let z = self
                .text_encoder
                .forward_with_token_embeddings(&ids, &overrides)?;
            let z = if weights.iter().all(|&w| w == 1.0) {
                z
            } else {
                // A1111: scale each token's output, then the chunk back to its mean.
                let w = Tensor::from_vec(weights, (1, n, 1), &self.device)?.to_dtype(z.dtype())?;
                let before = z.mean_all()?;
                let scaled = z.broadcast_mul(&w)?;
                let after = scaled.mean_all()?;
                scaled.broadcast_mul(&(before / after)?)?
            };
            outs.push(z);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// Prompt embeddings of different lengths (chunk counts, [`Self::encode_prompt`]) made
    /// equal by appending the empty prompt's chunk to the shorter ones, as A1111 pads the
    /// shorter of prompt and negative, and concatenated along the batch: `[sum b_i, L, D]`.
    pub fn cat_contexts(&self, contexts: &[&Tensor]) -> Result<Tensor> {
        let longest = contexts
            .iter()
            .map(|t| t.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        if contexts
            .iter()
            .all(|t| t.dim(1).is_ok_and(|l| l == longest))
        {
            return Ok(Tensor::cat(contexts, 0)?);
        }
        let empty = match self.empty_chunk.get() {
            Some(e) => e.clone(),
            None => {
                let e = self.text_encoder.forward(&self.tokenize("")?)?;
                self.empty_chunk.get_or_init(|| e).clone()
            }
        };
        let chunk = empty.dim(1)?;
        let padded = contexts
            .iter()
            .map(|t| {
                let (b, l, _) = t.dims3()?;
                if l == longest {
                    return Ok((*t).clone());
                }
                if (longest - l) % chunk != 0 {
                    return Err(Error::Invalid(format!(
                        "prompt embeddings of {l} and {longest} tokens cannot be padded to one length in chunks of {chunk}"
                    )));
                }
                let fill = empty
                    .to_dtype(t.dtype())?
                    .repeat((b, (longest - l) / chunk, 1))?;
                Ok(Tensor::cat(&[*t, &fill], 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&padded, 0)?)
    }

    /// The text encoder's clip skip ([`ClipTextModel::set_clip_skip`]); use this rather than
    /// the text encoder's own setter, so that the cached empty-prompt chunk follows it.
    pub fn set_clip_skip(&mut self, skip: usize) -> Result<()> {
        self.text_encoder.set_clip_skip(skip)?;
        self.empty_chunk = std::sync::OnceLock::new();
        Ok(())
    }

    /// Replaces the VAE with the diffusers `AutoencoderKL` in `dir` (e.g. a fine-tuned
    /// decoder such as sd-vae-ft-mse), which must share the UNet's latent channels.
    pub fn replace_vae(&mut self, dir: &Path) -> Result<()> {
        let vae = load_vae(dir, self.weight_dtype(), &self.device)?;
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

    /// An error if `text` uses `embedding:NAME` with no such embedding loaded (what
    /// [`Self::encode_prompt`] would refuse), without encoding it: commands check every
    /// prompt before they write anything.
    pub fn check_prompt(&self, text: &str) -> Result<()> {
        let names: Vec<&str> = self
            .textual_inversions
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        crate::embedding::textual_inversion::split(text, &names)
            .map(|_| ())
            .map_err(Error::Invalid)
    }

    /// Makes `ti` usable by name in this model's prompts (replacing one of the same name).
    /// `path` names its file in an error.
    pub fn add_textual_inversion(
        &mut self,
        ti: crate::embedding::textual_inversion::TextualInversion,
        path: &Path,
    ) -> Result<()> {
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

    /// Checks an externally supplied (e.g. learned negative) embedding against this model.
    pub fn check_embedding(&self, emb: &Tensor) -> Result<()> {
        let d = self.embed_dim();
        let n = self.tokenizer.max_len();
        match emb.dims() {
            [1, len, width] if *len == n && *width == d => Ok(()),
            dims => Err(Error::Invalid(format!(
                "embedding has shape {dims:?} but this model's text encoder needs [1, {n}, {d}]"
            ))),
        }
    }

    /// The guided noise prediction eps = u + g (c - u). With g = 1 that is c alone, and u is
    /// not computed unless it carries a gradient (which is then zero). (diffusers' pipeline skips guidance for every g <= 1; the formula is
    /// kept for g < 1 so the negative still acts and carries a gradient.)
    /// Both branches run in one batch unless the negative carries a gradient, in which case
    /// the conditional branch runs without a graph.
    ///
    /// # Shapes
    /// `latents`: `[b, C, h, w]`; `cond`, `uncond`: `[b, 77, D]`
    pub fn guided_eps(
        &self,
        latents: &Tensor,
        t: f64,
        cond: &Tensor,
        uncond: &Tensor,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let needs_grad = uncond.is_variable() || uncond.track_op();
        if guidance_scale == 1.0 && !needs_grad {
            return self.branch_eps(latents, t, cond, false);
        }
        let b = latents.dim(0)?;
        let (u, c) = if needs_grad {
            let c = self
                .branch_eps(&latents.detach(), t, &cond.detach(), false)?
                .detach();
            let u = self.branch_eps(latents, t, uncond, true)?;
            (u, c)
        } else {
            let x2 = Tensor::cat(&[latents, latents], 0)?;
            let ctx = self.cat_contexts(&[uncond, cond])?;
            let residuals = if self.controls.is_empty() {
                None
            } else if self.guess_mode {
                // diffusers: the ControlNets see the prompt's half; the negative's gets zeros.
                let r = self.control_residuals(latents, t, &ctx.narrow(0, b, b)?)?;
                Some(Residuals::cat(&[&r.zeros_like()?, &r])?)
            } else {
                Some(self.control_residuals(&x2, t, &ctx)?)
            };
            let out = self
                .unet
                .forward_with(&x2, &vec![t; 2 * b], &ctx, residuals.as_ref())?;
            (out.narrow(0, 0, b)?, out.narrow(0, b, b)?)
        };
        crate::guidance::guide(&u, &c, guidance_scale, self.guidance_rescale)
    }

    /// The UNet's prediction for one guidance branch on its own (`negative`: the negative
    /// embedding's branch), with the ControlNets' residuals: what the separate branches of
    /// the gradient step run.
    pub fn branch_eps(&self, x: &Tensor, t: f64, ctx: &Tensor, negative: bool) -> Result<Tensor> {
        if self.controls.is_empty() {
            return self.unet.forward(x, t, ctx);
        }
        let residuals = if negative && self.guess_mode {
            None
        } else {
            Some(self.control_residuals(x, t, ctx)?)
        };
        let b = x.dim(0)?;
        self.unet
            .forward_with(x, &vec![t; b], ctx, residuals.as_ref())
    }

    /// The summed residuals of every ControlNet for latents `x` `[b, ...]` with context `ctx`.
    fn control_residuals(&self, x: &Tensor, t: f64, ctx: &Tensor) -> Result<Residuals> {
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

    /// Adds a ControlNet (loaded from `source`) with its conditioning image `[1, 3, H, W]` in
    /// [0, 1] and scale. Refuses one whose residuals would not fit this UNet (another model
    /// family, or another architecture), naming `source`.
    pub fn add_controlnet(
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
        let f = 1usize << model.config().downsamplings();
        if f != self.vae_scale() {
            return refuse(
                "conditioning image downsampling",
                self.vae_scale().to_string(),
                f.to_string(),
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
        self.controls.push(crate::control::Control {
            model,
            image,
            scale,
            source: source.to_path_buf(),
        });
        Ok(())
    }

    /// The scheduler's x0 at step `i` from the two guidance branches `u` (negative) and `c`
    /// (prompt) on `latents` (the sampler's own scale).
    pub fn guided_x0(
        &self,
        u: &Tensor,
        c: &Tensor,
        i: usize,
        latents: &Tensor,
        g: f64,
    ) -> Result<Tensor> {
        self.scheduler.pred_original_sample(
            &crate::guidance::guide(u, c, g, self.guidance_rescale)?,
            i,
            latents,
        )
    }

    /// The sampler's run over `steps` from standard-normal `noise` (scaled here to the
    /// sampler's initial sigma), with guidance. A stochastic sampler's fresh noise comes
    /// from each image's seed in `seeds` ([`crate::rng::step_noise`]). Calls
    /// `on_step(i, t)` after each step. Returns the final latents.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &mut self,
        noise: Tensor,
        steps: usize,
        cond: &Tensor,
        uncond: &Tensor,
        guidance_scale: f64,
        seeds: &[u64],
        mut on_step: impl FnMut(usize, f64),
    ) -> Result<Tensor> {
        self.scheduler.set_timesteps(steps)?;
        let mut x = self.start_latents(noise)?;
        for i in 0..self.scheduler.len() {
            x = self.sample_step(&x, i, cond, uncond, guidance_scale, seeds)?;
            on_step(i, self.scheduler.timestep(i)?);
        }
        Ok(x)
    }

    /// Standard-normal noise scaled to the sampler's starting noise level.
    pub fn start_latents(&self, noise: Tensor) -> Result<Tensor> {
        let s = self.scheduler.init_noise_sigma();
        Ok(if s == 1.0 { noise } else { (noise * s)? })
    }

    /// One guided sampler step `i` from `x` (no gradient).
    pub fn sample_step(
        &mut self,
        x: &Tensor,
        i: usize,
        cond: &Tensor,
        uncond: &Tensor,
        guidance_scale: f64,
        seeds: &[u64],
    ) -> Result<Tensor> {
        let t = self.scheduler.timestep(i)?;
        let input = self.scheduler.scale_model_input(x, i)?;
        let eps = self.guided_eps(&input, t, cond, uncond, guidance_scale)?;
        let (dtype, device) = (x.dtype(), x.device().clone());
        let mut noise = |step: usize, shape: &[usize]| -> Result<Tensor> {
            Ok(crate::rng::batch_step_noise(
                seeds, step, shape, dtype, &device,
            )?)
        };
        Ok(self.scheduler.step(&eps, i, x, &mut noise)?.prev_sample)
    }

    /// Decodes latents as sampled (divides by the VAE's scaling_factor) to raw pixels in about
    /// [-1, 1], not clamped: `[b, C, h, w]` -> `[b, 3, H, W]`, and a video's
    /// `[b, C, frames, h, w]` -> `[b, 3, frames, H, W]`, each frame decoded on its own
    /// (diffusers' `TextToVideoSDPipeline.decode_latents`). Without a graph the frames go
    /// through the decoder one at a time, so a long clip needs no more memory than an image.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        if latents.rank() != 5 {
            return self.vae.decode(&(latents / self.vae.scaling_factor())?);
        }
        let (b, c, f, h, w) = latents.dims5()?;
        let frames = latents
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((b * f, c, h, w))?;
        let images = if latents.track_op() || latents.is_variable() {
            self.decode(&frames)?
        } else {
            let each = (0..b * f)
                .map(|i| self.decode(&frames.narrow(0, i, 1)?))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&each, 0)?
        };
        let (_, ch, hh, ww) = images.dims4()?;
        Ok(images
            .reshape((b, f, ch, hh, ww))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?)
    }

    /// Whether the model makes videos (a `UNet3DConditionModel`, diffusers'
    /// `TextToVideoSDPipeline`: ModelScope, ZeroScope).
    pub fn is_video(&self) -> bool {
        self.unet.config().video
    }

    /// The latents of one sample of `height` x `width` pixels: `[C, h, w]`, or a video's
    /// `[C, frames, h, w]`. `frames` must be given for a video model and only for one.
    pub fn latent_shape(
        &self,
        height: usize,
        width: usize,
        frames: Option<usize>,
    ) -> Result<Vec<usize>> {
        let f = self.vae_scale();
        let (c, h, w) = (self.latent_channels(), height / f, width / f);
        match (self.is_video(), frames) {
            (false, None) => Ok(vec![c, h, w]),
            (true, Some(n)) if n > 0 => Ok(vec![c, n, h, w]),
            (true, _) => Err(Error::Invalid(format!(
                "{} is a text-to-video model: give a number of frames (at least 1)",
                self.root.display()
            ))),
            (false, Some(_)) => Err(Error::Invalid(format!(
                "{} makes images, not videos: drop the number of frames",
                self.root.display()
            ))),
        }
    }

    /// ReNeg's differentiable step: from `latents` at sampler step `i`, one guided UNet step
    /// and the scheduler's x0 prediction. The gradient flows to `uncond` only.
    pub fn predict_x0(
        &self,
        latents: &Tensor,
        i: usize,
        cond: &Tensor,
        uncond: &Tensor,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let latents = latents.detach();
        let t = self.scheduler.timestep(i)?;
        let input = self.scheduler.scale_model_input(&latents, i)?;
        let eps = self.guided_eps(&input, t, cond, uncond, guidance_scale)?;
        self.scheduler.pred_original_sample(&eps, i, &latents)
    }
}

/// A1111's chunking: tokens (id, weight, vector) into chunks of at most `len`. A full chunk
/// ends after its last comma when that comma is within the last 20 tokens (the rest moves
/// to the next chunk); `None` (BREAK) ends a chunk; a textual-inversion embedding's vectors
/// stay in one chunk. An empty prompt is one empty chunk.
type Token = (u32, f64, Option<Tensor>);

fn chunk_tokens(items: Vec<Option<Token>>, len: usize, comma: Option<u32>) -> Vec<Vec<Token>> {
    const COMMA_BACKTRACK: usize = 20;
    let mut chunks: Vec<Vec<Token>> = Vec::new();
    let mut chunk: Vec<Token> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut i = 0;
    while i < items.len() {
        let Some(item) = &items[i] else {
            chunks.push(std::mem::take(&mut chunk));
            last_comma = None;
            i += 1;
            continue;
        };
        if Some(item.0) == comma && item.2.is_none() {
            last_comma = Some(chunk.len());
        } else if chunk.len() == len {
            if let Some(c) = last_comma.filter(|&c| len - c <= COMMA_BACKTRACK) {
                let moved = chunk.split_off(c + 1);
                chunks.push(std::mem::replace(&mut chunk, moved));
                last_comma = None;
            }
        }
        if chunk.len() == len {
            chunks.push(std::mem::take(&mut chunk));
            last_comma = None;
        }
        if item.2.is_some() {
            // An embedding's vectors are not split across chunks.
            let run = items[i..]
                .iter()
                .take_while(|t| t.as_ref().is_some_and(|t| t.2.is_some()))
                .count()
                .min(len);
            if chunk.len() + run > len {
                chunks.push(std::mem::take(&mut chunk));
                last_comma = None;
            }
            for t in items[i..i + run].iter().flatten() {
                chunk.push(t.clone());
            }
            i += run;
            continue;
        }
        chunk.push(item.clone());
        i += 1;
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    chunks
}
