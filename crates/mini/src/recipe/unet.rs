//! The tiny UNet: a diffusers `UNet2DConditionModel` trained to predict the noise on the VAE's
//! latents, conditioned on the frozen CLIP text tower, with 10% of captions dropped to the
//! empty prompt so classifier-free guidance works. Writes the rest of the pipeline folder
//! (`model_index.json`, the DDIM scheduler) beside it.

use super::{batch, fit, mkdir, save_vars, token_ids, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::DataConfig;
use candle_core::{DType, Device, Tensor};
use reneg::error::Result;
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::rng::{randn, SplitMix64};
use reneg::tokenizer::ClipTokenizer;
use reneg::weights::{Vb, Weights};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

const BATCH: usize = 32;
const CAPTION_DROPOUT: f64 = 0.1;
const TRAIN_TIMESTEPS: usize = 1000;

pub fn config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
        "act_fn": "silu", "attention_head_dim": 4, "block_out_channels": [32, 64, 128],
        "center_input_sample": false, "cross_attention_dim": super::clip::WIDTH,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0,
        "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 16,
        "sample_size": 16, "use_linear_projection": false, "upcast_attention": false,
    })
}

fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "num_train_timesteps": TRAIN_TIMESTEPS,
        "prediction_type": "epsilon", "set_alpha_to_one": false, "steps_offset": 1,
        "timestep_spacing": "leading", "thresholding": false, "rescale_betas_zero_snr": false,
    })
}

fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null], "image_encoder": [null, null],
        "requires_safety_checker": false, "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// SD's training schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps.
fn alphas_cumprod() -> Vec<f64> {
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut acc = 1.0;
    (0..TRAIN_TIMESTEPS)
        .map(|i| {
            let beta = (a + (b - a) * i as f64 / (TRAIN_TIMESTEPS - 1) as f64).powi(2);
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

/// A noised training batch: `x_t`, each row's timestep, the captions' token ids and text
/// embeddings (from the frozen text encoder), the noise to predict, and the examples drawn.
pub(super) struct Noised {
    pub xt: Tensor,
    pub ts: Vec<f64>,
    pub ids: Tensor,
    /// The captions encoded (the empty prompt where one was dropped).
    pub captions: Vec<String>,
    pub ctx: Tensor,
    pub noise: Tensor,
    pub examples: Vec<crate::Example>,
}

/// What a denoiser trains on: the frozen text tower and VAE of the world's pipeline, and SD's
/// training noise schedule.
pub(super) struct Noiser {
    pub text_encoder: ClipTextModel,
    tok: ClipTokenizer,
    vae: AutoencoderKL,
    acp: Vec<f64>,
    data: DataConfig,
    dev: Device,
}

impl Noiser {
    /// The tokenizer and VAE under the pipeline folder `root`, and the frozen text encoder
    /// `text_weights` (a `CLIPTextModel` file with the pipeline's text encoder config: the
    /// CLIP's own file for the base UNet, the pipeline's for what trains on the final UNet).
    pub fn load(
        root: &std::path::Path,
        text_weights: &std::path::Path,
        dev: &Device,
    ) -> Result<Self> {
        let text_encoder = ClipTextModel::new(
            ClipTextConfig::load(&root.join("text_encoder/config.json"))?,
            &Vb::new(Weights::load(text_weights, DType::F32, dev)?),
        )?;
        let tok = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let vae_dir = root.join("vae");
        let vae = AutoencoderKL::new(
            VaeConfig::load(&vae_dir.join("config.json"))?,
            &Vb::new(Weights::load(
                &vae_dir.join("diffusion_pytorch_model.safetensors"),
                DType::F32,
                dev,
            )?),
        )?;
        Ok(Self {
            text_encoder,
            tok,
            vae,
            acp: alphas_cumprod(),
            data: DataConfig::default(),
            dev: dev.clone(),
        })
    }

    /// Examples `start..start + n` of dataset `data_seed`, encoded and noised at timesteps
    /// drawn from `rng` (with `drop`, 10% of captions replaced by the empty prompt first).
    pub fn batch(
        &self,
        data_seed: u64,
        start: u64,
        n: usize,
        rng: &mut SplitMix64,
        drop: bool,
    ) -> Result<Noised> {
        let dev = &self.dev;
        let (images, ex) = batch(data_seed, start, n, &self.data, dev)?;
        let captions: Vec<String> = ex
            .iter()
            .map(|e| {
                if drop && rng.uniform() < CAPTION_DROPOUT {
                    String::new()
                } else {
                    e.caption.clone()
                }
            })
            .collect();
        let ids = token_ids(&self.tok, &captions, dev)?;
        let ctx = self.text_encoder.forward(&ids)?.detach();
        let (mean, logvar) = self.vae.encode(&((images * 2.0)? - 1.0)?)?;
        let e0 = randn(rng.next_u64(), mean.dims(), DType::F32, dev)?;
        let scale = self.vae.scaling_factor();
        let x0 = ((mean + ((logvar * 0.5)?.exp()? * e0)?)? * scale)?.detach();
        let ts: Vec<usize> = (0..n)
            .map(|_| (rng.next_u64() % TRAIN_TIMESTEPS as u64) as usize)
            .collect();
        let (sa, sb): (Vec<f32>, Vec<f32>) = ts
            .iter()
            .map(|&t| (self.acp[t].sqrt() as f32, (1.0 - self.acp[t]).sqrt() as f32))
            .unzip();
        let noise = randn(rng.next_u64(), x0.dims(), DType::F32, dev)?;
        let col = |v: Vec<f32>| Tensor::from_vec(v, (n, 1, 1, 1), dev);
        let xt = (x0.broadcast_mul(&col(sa)?)? + noise.broadcast_mul(&col(sb)?)?)?;
        Ok(Noised {
            xt,
            ts: ts.iter().map(|&t| t as f64).collect(),
            ids,
            captions,
            ctx,
            noise,
            examples: ex,
        })
    }
}

/// The noise error of `predict` on 128 noised examples of the held-out-check dataset (the
/// same draws for every model, so the base UNet's and the fine-tuned one's compare).
pub(super) fn heldout_noise_mse(
    noiser: &Noiser,
    predict: impl Fn(&Noised) -> Result<Tensor>,
) -> Result<f64> {
    let mut rng = SplitMix64::new(7);
    let mut mse = 0.0;
    for k in 0..4u64 {
        let b = noiser.batch(CHECK_SEED, k * BATCH as u64, BATCH, &mut rng, false)?;
        mse += (predict(&b)? - &b.noise)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()? as f64
            / 4.0;
    }
    Ok(mse)
}

/// The UNet, on the CLIP's frozen text tower, written to `dir`: the pipeline's `unet/`, or
/// `unet-base/` where a joint fine-tune ([`super::joint`]) makes the pipeline's from it.
pub fn train(
    layout: &Layout,
    dir: &std::path::Path,
    seed: u64,
    steps: usize,
    dev: &Device,
) -> Result<ModelReport> {
    let root = layout.pipeline();
    let noiser = Noiser::load(&root, &layout.clip().join("model.safetensors"), dev)?;
    let dir = dir.to_path_buf();
    mkdir(&dir)?;
    let cfg_path = dir.join("config.json");
    let vb = Vb::new(Weights::trainable(seed ^ 0x0E7, DType::F32, dev));
    let unet = UNet2DConditionModel::new(UNetConfig::from_value(config(), &cfg_path)?, &vb)?;
    let clock = Instant::now();
    let fitted = fit(
        "unet",
        vb.vars(),
        steps,
        1e-3,
        &super::checkpoint_path(layout, "unet"),
        |step| {
            // Each step's caption dropout, timesteps and noise come from the step alone, so a
            // run resumed from a checkpoint draws what an uninterrupted one would.
            let mut rng = SplitMix64::new((seed ^ 0xD1FF).wrapping_add((step as u64) << 32));
            rng.next_u64();
            let b = noiser.batch(TRAIN_SEED, (step * BATCH) as u64, BATCH, &mut rng, true)?;
            let pred = unet.forward_each(&b.xt, &b.ts, &b.ctx)?;
            Ok((pred - b.noise)?.sqr()?.mean_all()?)
        },
    )?;
    let heldout = heldout_noise_mse(&noiser, |b| {
        Ok(unet.forward_each(&b.xt, &b.ts, &b.ctx)?.detach())
    })?;

    write_json(&cfg_path, &config())?;
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    mkdir(&root.join("scheduler"))?;
    write_json(
        &root.join("scheduler/scheduler_config.json"),
        &scheduler_config(),
    )?;
    write_json(&root.join("model_index.json"), &model_index())?;
    let mut checks = serde_json::Map::new();
    checks.insert("heldout_noise_mse".into(), json!(heldout));
    Ok(ModelReport {
        model: "unet".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}
