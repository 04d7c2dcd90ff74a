//! The tiny UNet: a diffusers `UNet2DConditionModel` trained to predict the noise on the VAE's
//! latents, conditioned on the frozen CLIP text tower, with 10% of captions dropped to the
//! empty prompt so classifier-free guidance works. Writes the rest of the pipeline folder
//! (`model_index.json`, the DDIM scheduler) beside it.

use super::{batch, fit, mkdir, save_vars, token_ids, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::DataConfig;
use candle_core::{DType, Device, Tensor};
use reneg::error::{Error, Result};
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::rng::{randn, SplitMix64};
use reneg::scheduler::schedule::Schedule;
use reneg::scheduler::{PredictionType, SchedulerConfig};
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

/// SD's schedule and objective: the base UNet predicts the noise, on betas linear in sqrt from
/// 0.00085 to 0.012, sampled from timestep 951 down (DDIM's "leading" spacing).
pub(super) fn sd_scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "num_train_timesteps": TRAIN_TIMESTEPS,
        "prediction_type": "epsilon", "set_alpha_to_one": false, "steps_offset": 1,
        "timestep_spacing": "leading", "thresholding": false, "rescale_betas_zero_snr": false,
    })
}

/// SD's betas rescaled to zero terminal SNR, the UNet predicting v, sampling from timestep
/// 999 ("trailing"), as Lin et al. (2024) fix SD's schedule and diffusers ships the fix. SD's
/// schedule leaves sqrt(alpha-bar) = 0.068 of the image at t = 999; on 16x16 latents that is
/// enough to read where a shape is (a UNet of the third world, shown a circle on one side at
/// t = 999, predicts it on that side in 22 of 24 noises whatever the caption says), so a UNet
/// trained on it learns to take the layout from the noise, and at sampling time, where x_T
/// is pure noise, it draws shapes where the seed's noise happens to lean.
pub(super) fn zero_snr_scheduler_config() -> Value {
    let mut c = sd_scheduler_config();
    let m = c.as_object_mut().expect("a JSON object");
    m.insert("prediction_type".into(), json!("v_prediction"));
    m.insert("rescale_betas_zero_snr".into(), json!(true));
    m.insert("timestep_spacing".into(), json!("trailing"));
    c
}

/// Writes `scheduler` as the pipeline's scheduler config.
pub(super) fn write_scheduler(root: &std::path::Path, scheduler: &Value) -> Result<()> {
    mkdir(&root.join("scheduler"))?;
    write_json(&root.join("scheduler/scheduler_config.json"), scheduler)
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

/// A noised training batch: `x_t`, each row's timestep, the captions' token ids and text
/// embeddings (from the frozen text encoder), what the UNet is to predict, and the examples
/// drawn.
pub(super) struct Noised {
    pub xt: Tensor,
    pub ts: Vec<f64>,
    pub ids: Tensor,
    /// The captions encoded (the empty prompt where one was dropped).
    pub captions: Vec<String>,
    pub ctx: Tensor,
    /// The noise (epsilon-prediction) or sqrt(alpha-bar) noise - sqrt(1 - alpha-bar) x0
    /// (v-prediction), as the scheduler config says.
    pub target: Tensor,
    pub examples: Vec<crate::Example>,
}

/// What a denoiser trains on: the frozen text tower and VAE of the world's pipeline, and a
/// scheduler config's training schedule and prediction type (the same file the pipeline
/// samples with, so what a UNet learns and how it is sampled cannot disagree).
pub(super) struct Noiser {
    pub text_encoder: ClipTextModel,
    tok: ClipTokenizer,
    vae: AutoencoderKL,
    acp: Vec<f64>,
    v_prediction: bool,
    data: DataConfig,
    dev: Device,
}

impl Noiser {
    /// The tokenizer and VAE under the pipeline folder `root`, and the frozen text encoder
    /// `text_weights` (a `CLIPTextModel` file with the pipeline's text encoder config: the
    /// CLIP's own file for the base UNet, the pipeline's for what trains on the final UNet),
    /// noising as the diffusers scheduler config `scheduler` does.
    pub fn load(
        root: &std::path::Path,
        text_weights: &std::path::Path,
        scheduler: &Value,
        dev: &Device,
    ) -> Result<Self> {
        let sched_path = root.join("scheduler/scheduler_config.json");
        let sched = SchedulerConfig::from_value(scheduler.clone(), &sched_path)?;
        let v_prediction = match sched.prediction_type {
            PredictionType::Epsilon => false,
            PredictionType::VPrediction => true,
            PredictionType::Sample => {
                return Err(Error::Invalid(format!(
                    "{}: the miniature world trains epsilon or v_prediction UNets, not sample",
                    sched_path.display()
                )))
            }
        };
        // The core's table (float32, as diffusers builds it), rescaled where the config says.
        let acp = Schedule::new(&sched)
            .alphas_cumprod
            .iter()
            .map(|&a| a as f64)
            .collect();
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
            acp,
            v_prediction,
            data: DataConfig::default(),
            dev: dev.clone(),
        })
    }

    /// What the UNet learns to predict: "noise" or "v" (names the recipe's error checks).
    pub fn target_name(&self) -> &'static str {
        if self.v_prediction {
            "v"
        } else {
            "noise"
        }
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
        let col = |v: &[f32]| Tensor::from_vec(v.to_vec(), (n, 1, 1, 1), dev);
        let (sa, sb) = (col(&sa)?, col(&sb)?);
        let xt = (x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?;
        let target = if self.v_prediction {
            (noise.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?)?
        } else {
            noise
        };
        Ok(Noised {
            xt,
            ts: ts.iter().map(|&t| t as f64).collect(),
            ids,
            captions,
            ctx,
            target,
            examples: ex,
        })
    }
}

/// The error of `predict` (against the noise or v, as the noiser's objective is) on 128
/// noised examples of the held-out-check dataset (the same draws for every model).
pub(super) fn heldout_mse(
    noiser: &Noiser,
    predict: impl Fn(&Noised) -> Result<Tensor>,
) -> Result<f64> {
    let mut rng = SplitMix64::new(7);
    let mut mse = 0.0;
    for k in 0..4u64 {
        let b = noiser.batch(CHECK_SEED, k * BATCH as u64, BATCH, &mut rng, false)?;
        mse += (predict(&b)? - &b.target)?
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
    let scheduler = sd_scheduler_config();
    let noiser = Noiser::load(
        &root,
        &layout.clip().join("model.safetensors"),
        &scheduler,
        dev,
    )?;
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
            Ok((pred - b.target)?.sqr()?.mean_all()?)
        },
    )?;
    let heldout = heldout_mse(&noiser, |b| {
        Ok(unet.forward_each(&b.xt, &b.ts, &b.ctx)?.detach())
    })?;

    write_json(&cfg_path, &config())?;
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    write_scheduler(&root, &scheduler)?;
    write_json(&root.join("model_index.json"), &model_index())?;
    let mut checks = serde_json::Map::new();
    checks.insert(
        format!("heldout_{}_mse", noiser.target_name()),
        json!(heldout),
    );
    Ok(ModelReport {
        model: "unet".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed_pipeline() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/mini/pipeline")
    }

    fn noiser(scheduler: &Value) -> Noiser {
        let root = committed_pipeline();
        let te = root.join("text_encoder/model.safetensors");
        Noiser::load(&root, &te, scheduler, &Device::Cpu).unwrap()
    }

    /// The v target is sqrt(alpha-bar) noise - sqrt(1 - alpha-bar) x0 (diffusers'
    /// `get_velocity`): from the same draws, the clean latent recovered from x_t and v equals
    /// the one recovered from x_t and the noise. A v with its terms swapped or a sign wrong, or
    /// a noiser that ignored the config's prediction type, fails it.
    #[test]
    fn v_and_noise_targets_describe_the_same_clean_latent() {
        let v_cfg = zero_snr_scheduler_config();
        let mut eps_cfg = v_cfg.clone();
        eps_cfg["prediction_type"] = json!("epsilon");
        let (v, eps) = (noiser(&v_cfg), noiser(&eps_cfg));
        assert_eq!((v.target_name(), eps.target_name()), ("v", "noise"));
        let bv = v
            .batch(TRAIN_SEED, 0, 8, &mut SplitMix64::new(3), false)
            .unwrap();
        let be = eps
            .batch(TRAIN_SEED, 0, 8, &mut SplitMix64::new(3), false)
            .unwrap();
        assert_eq!(bv.ts, be.ts);
        let rows = |t: &Tensor| t.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        let (xt, tv, te) = (rows(&bv.xt), rows(&bv.target), rows(&be.target));
        assert_eq!(xt, rows(&be.xt));
        let mut checked = 0;
        for (i, &t) in bv.ts.iter().enumerate() {
            let a = v.acp[t as usize];
            if a < 1e-3 {
                continue; // x0 from the noise divides by sqrt(alpha-bar)
            }
            let (sa, sb) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
            for j in 0..xt[i].len() {
                let from_v = sa * xt[i][j] - sb * tv[i][j];
                let from_noise = (xt[i][j] - sb * te[i][j]) / sa;
                assert!(
                    (from_v - from_noise).abs() < 2e-3,
                    "row {i} (t {t}): {from_v} vs {from_noise}"
                );
            }
            checked += 1;
        }
        assert!(checked >= 6, "{:?}", bv.ts);
    }

    /// The zero-SNR config's training schedule leaves nothing of the image at t = 999 and keeps
    /// SD's first step; SD's leaves sqrt(alpha-bar) = 0.068 (what the base UNet learnt to read).
    #[test]
    fn the_zero_snr_schedule_ends_in_pure_noise() {
        let (z, sd) = (
            noiser(&zero_snr_scheduler_config()),
            noiser(&sd_scheduler_config()),
        );
        assert_eq!(z.acp[TRAIN_TIMESTEPS - 1], 0.0);
        assert!((sd.acp[TRAIN_TIMESTEPS - 1].sqrt() - 0.068).abs() < 5e-4);
        assert!((z.acp[0] - sd.acp[0]).abs() < 1e-6);
    }
}
