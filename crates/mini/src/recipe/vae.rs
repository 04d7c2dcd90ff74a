//! The tiny VAE: a diffusers `AutoencoderKL` (32x32 RGB <-> 16x16x4 latents, one downsampling) trained on clean and
//! degraded images with a pixel loss and a small KL term. Its `scaling_factor` is set, as for
//! Stable Diffusion, to one over the standard deviation of the training latents.

use super::{batch, fit, mkdir, save_vars, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::DataConfig;
use candle_core::{DType, Device, Tensor};
use reneg::error::Result;
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::weights::{Vb, Weights};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

const BATCH: usize = 16;
const KL_WEIGHT: f64 = 1e-4;

pub fn config(scaling_factor: f64) -> Value {
    json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
        "act_fn": "silu", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 32,
        "scaling_factor": scaling_factor, "force_upcast": false,
        "mid_block_add_attention": true, "use_quant_conv": true, "use_post_quant_conv": true,
    })
}

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let dir = layout.pipeline().join("vae");
    mkdir(&dir)?;
    let cfg_path = dir.join("config.json");
    let vae_cfg = VaeConfig::from_value(config(1.0), &cfg_path)?;
    let vb = Vb::new(Weights::trainable(seed ^ 0x7AE, DType::F32, dev));
    let vae = AutoencoderKL::new(vae_cfg, &vb)?;
    let data = DataConfig::default();
    let clock = Instant::now();
    let mut noise_seed = seed;
    let fitted = fit(
        "vae",
        vb.vars(),
        steps,
        2e-3,
        &super::checkpoint_path(layout, "vae"),
        |step| {
            let (images, _) = batch(TRAIN_SEED, (step * BATCH) as u64, BATCH, &data, dev)?;
            let x = ((images * 2.0)? - 1.0)?;
            let (mean, logvar) = vae.encode(&x)?;
            noise_seed = noise_seed.wrapping_add(1);
            let eps = reneg::rng::randn(noise_seed, mean.dims(), DType::F32, dev)?;
            let z = (&mean + ((&logvar * 0.5)?.exp()? * eps)?)?;
            let recon = vae.decode(&z)?;
            let mse = (recon - &x)?.sqr()?.mean_all()?;
            let kl = (((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?.mean_all()?;
            Ok((mse + (kl * (0.5 * KL_WEIGHT))?)?)
        },
    )?;

    // Held-out reconstruction error (of the latent mean) and the latents' spread.
    let (images, _) = batch(CHECK_SEED, 0, 128, &data, dev)?;
    let x = ((images * 2.0)? - 1.0)?;
    let (mean, _) = vae.encode(&x.detach())?;
    let mean = mean.detach();
    let recon = vae.decode(&mean)?.detach();
    let rmse = (recon.clamp(-1f32, 1f32)? - &x)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?
        .sqrt()
        / 2.0;
    let values = mean.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let m = values.iter().sum::<f64>() / values.len() as f64;
    let sd = (values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64).sqrt();
    let scaling = 1.0 / sd.max(1e-6);

    write_json(&cfg_path, &config(scaling))?;
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        HashMap::<String, Tensor>::new(),
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let mut checks = serde_json::Map::new();
    checks.insert("heldout_rmse_0_1".into(), json!(rmse));
    checks.insert("scaling_factor".into(), json!(scaling));
    Ok(ModelReport {
        model: "vae".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}
