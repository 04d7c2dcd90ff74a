//! The miniature world's ControlNet (issue 18's transfer experiment): a diffusers
//! `ControlNetModel` on the trained UNet, conditioned on each scene's shape mask
//! ([`crate::Scene::mask`]: where the shapes are, not their colours). As the ControlNet paper
//! trains one, its contracting half starts as a copy of the UNet's, its 1x1 output
//! convolutions and the conditioning embedding's last convolution start at zero (so training
//! starts from the UNet unchanged), and it learns the noise prediction through the frozen UNet.

use super::unet::Noiser;
use super::{fit, mkdir, save_vars, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use candle_core::{DType, Device, Tensor};
use reneg::error::Result;
use reneg::models::controlnet::{ControlNetConfig, ControlNetModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::rng::SplitMix64;
use reneg::weights::{Vb, Weights};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

const BATCH: usize = 32;
/// The UNet's learning rate. A pilot at 5e-4 (200 steps on the second world's UNet) lowered the
/// held-out noise error by 0.1% only.
const LR: f64 = 1e-3;

/// The ControlNet's config: the UNet's contracting half, and a conditioning embedding that
/// halves the mask's size once, as the world's VAE does (32 px images, 16 latents).
pub fn config() -> Value {
    let mut c = super::unet::config();
    let m = c.as_object_mut().expect("a JSON object");
    m.insert("_class_name".into(), json!("ControlNetModel"));
    m.remove("up_block_types");
    m.remove("out_channels");
    m.insert("conditioning_channels".into(), json!(3));
    m.insert(
        "conditioning_embedding_out_channels".into(),
        json!([16, 32]),
    );
    m.insert("controlnet_conditioning_channel_order".into(), json!("rgb"));
    m.insert("global_pool_conditions".into(), json!(false));
    c
}

/// Masks of `examples`' scenes, `[n, 3, s, s]`.
fn masks(examples: &[crate::Example], size: usize, dev: &Device) -> Result<Tensor> {
    let data: Vec<f32> = examples.iter().flat_map(|e| e.scene.mask(size)).collect();
    Ok(Tensor::from_vec(
        data,
        (examples.len(), 3, size, size),
        dev,
    )?)
}

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let root = layout.pipeline();
    // The ControlNet learns what the UNet it steers predicts, on the schedule the pipeline
    // samples with (SD's for the third world, zero terminal SNR and v after a joint stage).
    let scheduler: Value = reneg::error::read_json(&root.join("scheduler/scheduler_config.json"))?;
    let noiser = Noiser::load(
        &root,
        &root.join("text_encoder/model.safetensors"),
        &scheduler,
        dev,
    )?;
    let unet_dir = root.join("unet");
    // The UNet's weights, read once: the frozen UNet, and the ControlNet's starting copy.
    let unet_vb = Vb::new(Weights::load(
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
        DType::F32,
        dev,
    )?);
    let unet =
        UNet2DConditionModel::new(UNetConfig::load(&unet_dir.join("config.json"))?, &unet_vb)?;
    let dir = layout.controlnet();
    mkdir(&dir)?;
    let cfg_path = dir.join("config.json");
    let vb = Vb::new(Weights::trainable(seed ^ 0xC0_17E7, DType::F32, dev));
    let controlnet = ControlNetModel::new(ControlNetConfig::from_value(config(), &cfg_path)?, &vb)?;
    for (name, var) in vb.vars() {
        let zero = [
            "controlnet_down_blocks.",
            "controlnet_mid_block.",
            "controlnet_cond_embedding.conv_out.",
        ]
        .iter()
        .any(|p| name.starts_with(p));
        if zero {
            var.set(&var.as_tensor().zeros_like()?)?;
        } else if unet_vb.contains(&name) {
            var.set(&unet_vb.get(var.dims(), &name)?)?;
        }
    }
    let size = crate::DataConfig::default().size;
    let clock = Instant::now();
    // Each row's squared error of the UNet's prediction (noise or v), `[n]`.
    let row_errors = |b: &super::unet::Noised, with_control: bool| -> Result<Tensor> {
        let residuals = if with_control {
            let m = masks(&b.examples, size, dev)?;
            Some(controlnet.forward_each(&b.xt, &b.ts, &b.ctx, &m, 1.0, false)?)
        } else {
            None
        };
        let pred = unet.forward_with(&b.xt, &b.ts, &b.ctx, residuals.as_ref())?;
        Ok((pred - &b.target)?.sqr()?.flatten_from(1)?.mean(1)?)
    };
    let loss_of = |b: &super::unet::Noised, with_control: bool| -> Result<Tensor> {
        Ok(row_errors(b, with_control)?.mean_all()?)
    };
    let fitted = fit(
        "controlnet",
        vb.vars(),
        steps,
        LR,
        &super::checkpoint_path(layout, "controlnet"),
        |step| {
            let mut rng = SplitMix64::new((seed ^ 0xC0DE).wrapping_add((step as u64) << 32));
            rng.next_u64();
            let b = noiser.batch(TRAIN_SEED, (step * BATCH) as u64, BATCH, &mut rng, true)?;
            loss_of(&b, true)
        },
    )?;
    // Held out: the noise prediction's error with the mask's residuals and without them (the
    // UNet alone), on the same batches; over all timesteps, and over the noisier half (t >= 500),
    // where the image itself no longer shows where the shapes are and the mask can tell most.
    let (mut with, mut without) = (vec![], vec![]);
    let mut noisy = vec![];
    let mut check_rng = SplitMix64::new(11);
    for k in 0..4u64 {
        let b = noiser.batch(CHECK_SEED, k * BATCH as u64, BATCH, &mut check_rng, false)?;
        with.extend(row_errors(&b, true)?.to_vec1::<f32>()?);
        without.extend(row_errors(&b, false)?.to_vec1::<f32>()?);
        noisy.extend(b.ts.iter().map(|&t| t >= 500.0));
    }
    let mean = |v: &[f32], keep: &dyn Fn(usize) -> bool| -> f64 {
        let kept: Vec<f64> = (0..v.len())
            .filter(|&i| keep(i))
            .map(|i| v[i] as f64)
            .collect();
        kept.iter().sum::<f64>() / kept.len().max(1) as f64
    };
    let all = |_: usize| true;
    let high = |i: usize| noisy[i];
    write_json(&cfg_path, &config())?;
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let mut checks = serde_json::Map::new();
    checks.insert(
        format!("heldout_{}_mse_with_mask", noiser.target_name()),
        json!(mean(&with, &all)),
    );
    checks.insert(
        format!("heldout_{}_mse_unet_alone", noiser.target_name()),
        json!(mean(&without, &all)),
    );
    checks.insert(
        format!("heldout_{}_mse_t500_with_mask", noiser.target_name()),
        json!(mean(&with, &high)),
    );
    checks.insert(
        format!("heldout_{}_mse_t500_unet_alone", noiser.target_name()),
        json!(mean(&without, &high)),
    );
    Ok(ModelReport {
        model: "controlnet".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}
