//! A loaded model as the three roles of its family (prompt encoder, denoiser, decoder;
//! [`crate::family::roles`]) with the sampler: classifier-free guided sampling, decoding, and the
//! one guided step through which ReNeg's gradient reaches the negative. Everything here is
//! written once for every family.

use crate::conditioning::Conditioning;
use crate::error::{Error, Result};
use crate::family::roles::{Branch, Decoder, Denoiser, PromptEncoder};
use crate::family::Family;
use crate::scheduler::{Scheduler, SchedulerConfig};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// How the two guidance branches (the negative's and the prompt's) of a sampling step run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BranchMode {
    /// Apart on small latents on a CPU with several threads, else batched.
    #[default]
    Auto,
    /// One batch of both.
    Batched,
    /// Side by side, each on its own thread.
    Apart,
}

/// Latent elements per sample up to which the two guidance branches run side by side rather
/// than as one batch: on small latents most operations are too small to split across
/// threads (the hand-offs cost more than they save), while two whole branches keep two cores
/// busy. Measured on 2 cores (BENCHMARKS.md): at 16x16x4 latents the tiny pipeline's
/// training step 0.17-0.19 -> 0.14-0.16 s and the full-size UNet's sampling evaluation and
/// gradient step 3-20% faster; at 32x32x4 the full-size UNet was 5-12% slower apart, so
/// larger latents keep the batch.
const CONCURRENT_BRANCHES_MAX: usize = 4 * 16 * 16;

pub struct Pipeline {
    pub encoder: Box<dyn PromptEncoder>,
    pub denoiser: Box<dyn Denoiser>,
    pub decoder: Box<dyn Decoder>,
    pub scheduler: Scheduler,
    /// Set when the model's scheduler config names a sampler reneg stands another in for.
    pub scheduler_note: Option<String>,
    pub root: PathBuf,
    /// diffusers' `guidance_rescale` (0: plain classifier-free guidance; [`crate::guidance`]).
    pub guidance_rescale: f64,
    /// How the two guidance branches of a step run (the same results either way).
    pub branch_mode: BranchMode,
    dtype: DType,
    device: Device,
}

impl Pipeline {
    /// Loads a diffusers pipeline folder (with `model_index.json`).
    pub fn load(root: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_loras(root, dtype, device, &[])
    }

    /// [`Self::load`] with LoRAs merged into the denoiser's and the text encoder's weights.
    pub fn load_with_loras(
        root: &Path,
        dtype: DType,
        device: &Device,
        loras: &[crate::lora::Lora],
    ) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::file(root, "model folder not found"));
        }
        if !root.join("model_index.json").is_file() {
            return Err(Error::file(
                root,
                "not a diffusers pipeline folder (no model_index.json); pass the folder saved by save_pretrained",
            ));
        }
        // The family is decided before any weight is read: a pipeline reneg does not run is
        // refused by its class name.
        let family = Family::of_folder(root)?;
        let roles = Family::load_folder(family, root, dtype, device, loras)?;
        let scheduler = SchedulerConfig::load(&root.join("scheduler/scheduler_config.json"))?;
        Self::from_roles(roles, scheduler, root, dtype, device)
    }

    /// A pipeline of loaded roles; refuses a decoder whose latents the denoiser does not take.
    pub fn from_roles(
        (encoder, denoiser, decoder): crate::family::Roles,
        scheduler: SchedulerConfig,
        root: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (have, want) = (decoder.latent_channels(), denoiser.latent_channels());
        if have != want {
            return Err(Error::file(
                root,
                format!("a decoder of {have} latent channels; the denoiser takes {want}"),
            ));
        }
        let (scheduler, scheduler_note) = Scheduler::from_config(scheduler)?;
        Ok(Self {
            encoder,
            denoiser,
            decoder,
            scheduler,
            scheduler_note,
            root: root.to_path_buf(),
            guidance_rescale: 0.0,
            branch_mode: BranchMode::default(),
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

    /// Activation checkpointing of the denoiser's layers and the decoder's blocks on the
    /// gradient path (same gradients, less memory, one more forward of each in the backward).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.encoder.set_checkpointing(on);
        self.denoiser.set_checkpointing(on);
        self.decoder.set_checkpointing(on);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Width of the text embeddings (768 for SD1.x, 1024 for SD2.x).
    pub fn embed_dim(&self) -> usize {
        self.encoder.shape().width
    }

    /// Pixels per latent along a side.
    pub fn vae_scale(&self) -> usize {
        self.decoder.scale()
    }

    pub fn latent_channels(&self) -> usize {
        self.denoiser.latent_channels()
    }

    /// The image side the model was trained at (512 when its config does not say).
    pub fn default_size(&self) -> usize {
        self.denoiser.sample_size().unwrap_or(64) * self.vae_scale()
    }

    /// Image sides must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale() * self.denoiser.size_multiple()
    }

    /// The image size of a run: `height` and `width` asked (default: [`Self::default_size`]),
    /// checked to be positive multiples of [`Self::size_multiple`].
    pub fn image_size(
        &self,
        height: Option<usize>,
        width: Option<usize>,
    ) -> Result<(usize, usize)> {
        let px = self.default_size();
        let (h, w) = (height.unwrap_or(px), width.unwrap_or(px));
        let factor = self.size_multiple();
        if h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
            return Err(Error::Invalid(format!(
                "--height {h} / --width {w}: both must be positive multiples of {factor} for this model"
            )));
        }
        Ok((h, w))
    }

    /// One prompt's conditioning, batch 1 (the family's encoder; for SD, with textual
    /// inversions, clip skip and the prompt syntax set).
    pub fn encode(&self, text: &str) -> Result<Conditioning> {
        self.encoder.encode(text)
    }

    /// Conditionings concatenated along the batch (the encoder makes lengths equal first).
    pub fn batch(&self, conds: &[&Conditioning]) -> Result<Conditioning> {
        self.encoder.batch(conds)
    }

    /// What the negative branch is conditioned on when no negative is given.
    pub fn no_negative(&self) -> Result<Conditioning> {
        self.encoder.no_negative()
    }

    /// An error if `text` names a textual inversion that is not loaded, without encoding it:
    /// commands check every prompt before they write anything.
    pub fn check_prompt(&self, text: &str) -> Result<()> {
        self.encoder.check_prompt(text)
    }

    /// The error for an option the family has no place for, naming the family.
    fn refuse(&self, e: Error) -> Error {
        match e {
            e @ Error::NotInFamily { .. } => Error::file(&self.root, e.to_string()),
            e => e,
        }
    }

    /// Makes `ti` usable by name in this model's prompts (replacing one of the same name).
    /// `path` names its file in an error.
    pub fn add_textual_inversion(
        &mut self,
        ti: crate::embedding::textual_inversion::TextualInversion,
        path: &Path,
    ) -> Result<()> {
        self.encoder
            .add_textual_inversion(ti, path)
            .map_err(|e| self.refuse(e))
    }

    pub fn set_clip_skip(&mut self, skip: usize) -> Result<()> {
        self.encoder.set_clip_skip(skip).map_err(|e| self.refuse(e))
    }

    pub fn set_text_cache(&mut self, file: &Path) -> Result<()> {
        self.encoder
            .set_text_cache(file)
            .map_err(|e| self.refuse(e))
    }

    /// Encodes a run's prompts ahead of sampling ([`PromptEncoder::encode_ahead`]).
    pub fn encode_ahead(&self, texts: &[&str]) -> Result<()> {
        self.encoder.encode_ahead(texts)
    }

    pub fn set_max_length(&mut self, tokens: usize) -> Result<()> {
        self.encoder
            .set_max_length(tokens)
            .map_err(|e| self.refuse(e))
    }

    pub fn set_prompt_syntax(&mut self, syntax: crate::prompt_syntax::PromptSyntax) -> Result<()> {
        self.encoder
            .set_prompt_syntax(syntax)
            .map_err(|e| self.refuse(e))
    }

    /// Replaces the decoder with the diffusers `AutoencoderKL` in `dir` (e.g. a fine-tuned
    /// decoder such as sd-vae-ft-mse), which must share the latent channels.
    pub fn replace_vae(&mut self, dir: &Path) -> Result<()> {
        self.decoder.replace(dir).map_err(|e| self.refuse(e))
    }

    /// Adds a ControlNet (loaded from `source`) with its conditioning image `[1, 3, H, W]` in
    /// [0, 1] and scale. Refuses one that would not fit the denoiser, naming `source`.
    pub fn add_controlnet(
        &mut self,
        model: crate::models::controlnet::ControlNetModel,
        image: Tensor,
        scale: f64,
        source: &Path,
    ) -> Result<()> {
        // The conditioning image is brought down to the latents' size.
        let f = 1usize << model.config().downsamplings();
        if f != self.vae_scale() {
            return Err(Error::file(
                source,
                format!(
                    "this ControlNet's conditioning image downsampling is {f}, the UNet's {}: a ControlNet for another model",
                    self.vae_scale()
                ),
            ));
        }
        self.denoiser
            .add_controlnet(model, image, scale, source)
            .map_err(|e| self.refuse(e))
    }

    pub fn set_guess_mode(&mut self, on: bool) -> Result<()> {
        self.denoiser.set_guess_mode(on).map_err(|e| self.refuse(e))
    }

    /// The ControlNets with their images.
    pub fn controls(&self) -> &[crate::control::Control] {
        self.denoiser.controls()
    }

    pub fn controls_mut(&mut self) -> &mut [crate::control::Control] {
        self.denoiser.controls_mut()
    }

    /// Checks a negative (a learned or official one) against what this model's encoder
    /// makes, its parts and their shapes, and returns it as the pipeline takes it (its dtype,
    /// its device). `source` names it in an error.
    pub fn negative(
        &self,
        e: &crate::embedding::NegativeEmbedding,
        source: &Path,
    ) -> Result<Conditioning> {
        let shape = self.encoder.shape();
        e.check_fits(&shape, source)?;
        if shape.mask && e.mask.is_none() {
            // check_fits let it through: its rows are T5's output for "" (the official
            // PixArt file), which only the mask of "" reads as it was made.
            let mut e = e.clone();
            e.mask = e.mask_of_empty()?;
            eprintln!(
                "{}: no {}; rows 1-{} are bitwise equal (T5's output for \"\"), so it takes the mask of \"\" (row 0 only)",
                source.display(),
                crate::conditioning::Part::Mask.name(true),
                e.tokens() - 1
            );
            return e.conditioning(self.dtype(), self.device());
        }
        e.conditioning(self.dtype(), self.device())
    }

    /// The guided noise prediction eps = u + g (c - u). With g = 1 that is c alone, and u is
    /// not computed unless it carries a gradient (which is then zero). (diffusers' pipeline
    /// skips guidance for every g <= 1; the formula is kept for g < 1 so the negative still
    /// acts and carries a gradient.) Both branches run in one batch unless the negative
    /// carries a gradient or the latents are small ([`Self::branches`]), in which case they
    /// run apart, the prompt's without a graph.
    ///
    /// # Shapes
    /// `latents`: `[b, C, h, w]`; `cond`, `uncond`: batch `b`
    pub fn guided_eps(
        &self,
        latents: &Tensor,
        t: f64,
        cond: &Conditioning,
        uncond: &Conditioning,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let needs_grad = uncond
            .parts()
            .iter()
            .any(|(_, t)| t.is_variable() || t.track_op());
        if guidance_scale == 1.0 && !needs_grad {
            return self.branch_eps(latents, t, cond, false);
        }
        let b = latents.dim(0)?;
        let (u, c) = if needs_grad || self.apart(latents) {
            self.branches(latents, t, cond, uncond)?
        } else {
            let x2 = Tensor::cat(&[latents, latents], 0)?;
            let both = self.batch(&[uncond, cond])?;
            let out = self.denoiser.forward(&x2, t, &both, Branch::Both)?;
            (out.narrow(0, 0, b)?, out.narrow(0, b, b)?)
        };
        crate::guidance::guide(&u, &c, guidance_scale, self.guidance_rescale)
    }

    /// The negative's and the prompt's conditionings (one batch size) made one length, as a
    /// batch of them would be.
    pub fn same_length(
        &self,
        uncond: &Conditioning,
        cond: &Conditioning,
    ) -> Result<(Conditioning, Conditioning)> {
        if uncond.embeds.dim(1)? == cond.embeds.dim(1)? {
            return Ok((uncond.clone(), cond.clone()));
        }
        let b = uncond.batch_size()?;
        let both = self.batch(&[uncond, cond])?;
        Ok((both.narrow(0, b)?, both.narrow(b, b)?))
    }

    /// Whether the guidance branches of `latents` run apart and side by side.
    fn apart(&self, latents: &Tensor) -> bool {
        match self.branch_mode {
            BranchMode::Batched => false,
            BranchMode::Apart => true,
            BranchMode::Auto => {
                let per_sample = latents.elem_count() / latents.dim(0).unwrap_or(1).max(1);
                latents.device().is_cpu()
                    && rayon::current_num_threads() > 1
                    && per_sample <= CONCURRENT_BRANCHES_MAX
            }
        }
    }

    /// The two guidance branches computed apart: `(u, c)`, the negative's (with a graph when
    /// `uncond` carries one) and the prompt's (without). Both conditionings are first made one
    /// length, as a batch of them would be (A1111's longer prompts pad the shorter with the
    /// empty prompt's chunks), so that either way of running them sees the same context. On a
    /// CPU with several threads and small latents the branches run side by side.
    pub fn branches(
        &self,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
        uncond: &Conditioning,
    ) -> Result<(Tensor, Tensor)> {
        let (uncond, cond) = self.same_length(uncond, cond)?;
        let run_u = || self.branch_eps(x, t, &uncond, true);
        let run_c = || -> Result<Tensor> {
            Ok(self
                .branch_eps(&x.detach(), t, &cond.detach(), false)?
                .detach())
        };
        if self.apart(x) {
            let (u, c) = rayon::join(run_u, run_c);
            Ok((u?, c?))
        } else {
            Ok((run_u()?, run_c()?))
        }
    }

    /// The denoiser's prediction for one guidance branch on its own (`negative`: the
    /// negative's branch): what the separate branches of the gradient step run.
    pub fn branch_eps(
        &self,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
        negative: bool,
    ) -> Result<Tensor> {
        let branch = if negative {
            Branch::Negative
        } else {
            Branch::Prompt
        };
        self.denoiser.forward(x, t, cond, branch)
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
        cond: &Conditioning,
        uncond: &Conditioning,
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
        cond: &Conditioning,
        uncond: &Conditioning,
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

    /// Decodes latents as sampled to raw pixels in about [-1, 1], not clamped: `[b, C, h, w]`
    /// -> `[b, 3, H, W]`, and a video's `[b, C, frames, h, w]` -> `[b, 3, frames, H, W]`, each
    /// frame decoded on its own (diffusers' `TextToVideoSDPipeline.decode_latents`). Without
    /// a graph the frames go through the decoder one at a time, so a long clip needs no more
    /// memory than an image.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        if latents.rank() != 5 {
            return self.decoder.decode(latents);
        }
        let (b, c, f, h, w) = latents.dims5()?;
        let frames = latents
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((b * f, c, h, w))?;
        let images = if latents.track_op() || latents.is_variable() {
            self.decoder.decode(&frames)?
        } else {
            let each = (0..b * f)
                .map(|i| self.decoder.decode(&frames.narrow(0, i, 1)?))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&each, 0)?
        };
        let (_, ch, hh, ww) = images.dims4()?;
        Ok(images
            .reshape((b, f, ch, hh, ww))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?)
    }

    /// SDXL's size conditioning; refused by families without it.
    pub fn set_size_conditioning(
        &mut self,
        sizes: crate::family::roles::SizeConditioning,
    ) -> Result<()> {
        if sizes.is_default() {
            return Ok(());
        }
        self.denoiser
            .set_size_conditioning(sizes)
            .map_err(|e| self.refuse(e))
    }

    /// What the family's own scripts sample with (guidance, steps, eta, frame rate).
    pub fn defaults(&self) -> crate::family::roles::Defaults {
        self.denoiser.defaults()
    }

    /// The frame rate the model is conditioned on, for a family that conditions on one.
    pub fn frame_rate(&self) -> Option<f64> {
        self.denoiser.frame_rate()
    }

    /// A clip's frame rate: what the model is conditioned on (VideoCrafter2), and otherwise
    /// only the rate its files play at, so nothing to set.
    pub fn set_fps(&mut self, fps: u32) -> Result<()> {
        if fps == 0 || fps > u16::MAX as u32 {
            return Err(Error::Invalid("--fps must be between 1 and 65535".into()));
        }
        match self.denoiser.frame_rate() {
            Some(_) => self.denoiser.set_frame_rate(fps as f64),
            None => Ok(()),
        }
    }

    /// Whether the model makes videos (latents with a frames axis).
    pub fn is_video(&self) -> bool {
        self.denoiser.is_video()
    }

    /// Sets the sampler `kind` (None: the model's own) and its `eta`. Returns the note to
    /// show when the model's config names a sampler reneg stands another in for and no kind
    /// was asked.
    pub fn set_sampler(
        &mut self,
        kind: Option<crate::scheduler::SchedulerKind>,
        eta: f64,
    ) -> Result<Option<String>> {
        let mut note = None;
        match kind {
            Some(k) if k != self.scheduler.kind() => {
                self.scheduler = self
                    .scheduler
                    .with_kind(k)
                    .map_err(|e| Error::Invalid(format!("--scheduler {k}: {e}")))?;
            }
            Some(_) => {}
            None => note.clone_from(&self.scheduler_note),
        }
        self.scheduler
            .set_eta(eta)
            .map_err(|e| Error::Invalid(format!("--eta: {e}")))?;
        Ok(note)
    }

    /// The frames per clip of a run (`frames` asked, or None): 16 by default for a video
    /// model, as diffusers' `TextToVideoSDPipeline`; refused for an image model.
    pub fn frames(&self, frames: Option<usize>) -> Result<Option<usize>> {
        match (self.is_video(), frames) {
            (true, None) => Ok(Some(16)),
            (true, Some(0)) => Err(Error::Invalid("--frames must be at least 1".into())),
            (true, Some(n)) => Ok(Some(n)),
            (false, None) => Ok(None),
            (false, Some(_)) => Err(Error::file(
                &self.root,
                "is a text-to-image model: drop --frames (`frames` in a config) or give a text-to-video model (a TextToVideoSDPipeline folder)",
            )),
        }
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
        cond: &Conditioning,
        uncond: &Conditioning,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let latents = latents.detach();
        let t = self.scheduler.timestep(i)?;
        let input = self.scheduler.scale_model_input(&latents, i)?;
        let eps = self.guided_eps(&input, t, cond, uncond, guidance_scale)?;
        self.scheduler.pred_original_sample(&eps, i, &latents)
    }
}
