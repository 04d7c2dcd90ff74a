//! The independent judge (see `mini::judge`), trained as a plain classifier on the judge
//! family's degradations (other kernels, strengths and tints than the reward saw), so that
//! agreeing with the reward is evidence, not an echo.
//!
//! It is calibrated to what the generator can make: half of its training images (clean or
//! degraded) pass through the world's VAE first, with their labels unchanged, so the VAE's
//! softness is not a defect in its eyes (a clean round trip is "clean") and it reads shapes,
//! colours and degradations through the decoder, as it must on generated images.

use super::{batch, fit, mkdir, save_vars, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::judge::{recognised, targets, Judge, JudgeConfig, WEIGHTS_FILE};
use crate::{DataConfig, Example, Family};
use candle_core::{DType, Device, Tensor, D};
use reneg::error::Result;
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::weights::{Vb, Weights};
use serde_json::json;
use std::collections::HashMap;
use std::time::Instant;

const BATCH: usize = 64;

fn data() -> DataConfig {
    DataConfig {
        degraded_share: 0.5,
        family: Family::Judge,
        ..DataConfig::default()
    }
}

fn quality_labels(ex: &[Example]) -> Vec<u32> {
    ex.iter()
        .map(|e| e.degradation.map_or(0, |d| d.kind() as u32 + 1))
        .collect()
}

/// Mean negative log-likelihood of the three heads.
fn loss(judge: &Judge, images: &Tensor, ex: &[Example], dev: &Device) -> Result<Tensor> {
    let out = judge.forward(images)?;
    let b = ex.len();
    let q = Tensor::from_vec(quality_labels(ex), (b, 1), dev)?;
    let lq = out.quality.gather(&q, 1)?.mean_all()?;
    let scenes: Vec<_> = ex.iter().map(|e| e.scene.clone()).collect();
    let (s, c) = targets(&scenes);
    let n = s.len() / b;
    let mask: Vec<f32> = s.iter().map(|&v| (v > 0) as u8 as f32).collect();
    let s = Tensor::from_vec(s, (b, n, 1), dev)?;
    let c = Tensor::from_vec(c, (b, n, 1), dev)?;
    let ls = out.shape.gather(&s, 2)?.mean_all()?;
    let mask = Tensor::from_vec(mask, (b, n, 1), dev)?;
    let lc = (out.colour.gather(&c, 2)? * mask)?
        .sum_all()?
        .affine(1.0 / b as f64, 0.0)?;
    Ok(((lq + ls)? + lc)?.neg()?)
}

/// The world's VAE, for round trips.
pub(crate) fn load_vae(layout: &Layout, dev: &Device) -> Result<AutoencoderKL> {
    let vae_dir = layout.pipeline().join("vae");
    AutoencoderKL::new(
        VaeConfig::load(&vae_dir.join("config.json"))?,
        &Vb::new(Weights::load(
            &vae_dir.join("diffusion_pytorch_model.safetensors"),
            DType::F32,
            dev,
        )?),
    )
}

/// Images in [0, 1] after the VAE (encode to the latent mean, decode, clamp).
pub(crate) fn round_trip(vae: &AutoencoderKL, images: &Tensor) -> Result<Tensor> {
    let (mean, _) = vae.encode(&((images * 2.0)? - 1.0)?)?;
    Ok(((vae.decode(&mean)? + 1.0)? * 0.5)?
        .clamp(0f32, 1f32)?
        .detach())
}

/// Whether example `index` of the judge's data is shown after a VAE round trip: every other
/// one, so each batch has both kinds in equal numbers.
fn through_vae(index: u64) -> bool {
    index % 2 == 1
}

/// A batch of the judge's data with [`through_vae`]'s examples replaced by their round trips.
fn mixed_batch(
    vae: &AutoencoderKL,
    seed: u64,
    start: u64,
    n: usize,
    data: &DataConfig,
    dev: &Device,
) -> Result<(Tensor, Vec<Example>)> {
    let (images, ex) = batch(seed, start, n, data, dev)?;
    let rt = round_trip(vae, &images)?;
    let mask: Vec<f32> = (start..start + n as u64)
        .map(|i| through_vae(i) as u8 as f32)
        .collect();
    let mask = Tensor::from_vec(mask, (n, 1, 1, 1), dev)?;
    let mixed = (rt.broadcast_mul(&mask)? + images.broadcast_mul(&(1.0 - &mask)?)?)?;
    Ok((mixed, ex))
}

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let vae = load_vae(layout, dev)?;
    let dir = layout.judge();
    mkdir(&dir)?;
    let cfg = JudgeConfig::default();
    let vb = Vb::new(Weights::trainable(seed ^ 0x1D6E, DType::F32, dev));
    let judge = Judge::new(cfg.clone(), &vb)?;
    let data = data();
    let clock = Instant::now();
    let fitted = fit(
        "judge",
        vb.vars(),
        steps,
        2e-3,
        &super::checkpoint_path(layout, "judge"),
        |step| {
            let (images, ex) = mixed_batch(
                &vae,
                TRAIN_SEED ^ 0x1D6E,
                (step * BATCH) as u64,
                BATCH,
                &data,
                dev,
            )?;
            loss(&judge, &images, &ex, dev)
        },
    )?;
    // Held-out checks, on crisp renderings and on round trips separately.
    let mut right = [[0usize; 2]; 2];
    let mut total = 0usize;
    for k in 0..4u64 {
        let (images, ex) = batch(CHECK_SEED ^ 0x1D6E, k * BATCH as u64, BATCH, &data, dev)?;
        let rt = round_trip(&vae, &images)?;
        for (i, images) in [images.detach(), rt].iter().enumerate() {
            let out = judge.forward(images)?;
            let pred = out.quality.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let truth = quality_labels(&ex);
            right[i][0] += pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
            let scenes: Vec<_> = ex.iter().map(|e| e.scene.clone()).collect();
            right[i][1] += recognised(&out, &scenes)?.iter().filter(|&&r| r).count();
        }
        total += ex.len();
    }
    write_json(
        &dir.join(crate::judge::CONFIG_FILE),
        &serde_json::to_value(&cfg).map_err(|e| reneg::error::Error::Invalid(e.to_string()))?,
    )?;
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &dir.join(WEIGHTS_FILE),
    )?;
    let mut checks = serde_json::Map::new();
    for (i, what) in ["", "_vae_round_trip"].iter().enumerate() {
        checks.insert(
            format!("heldout_degradation_accuracy{what}"),
            json!(right[i][0] as f64 / total as f64),
        );
        checks.insert(
            format!("heldout_shapes_and_colours_accuracy{what}"),
            json!(right[i][1] as f64 / total as f64),
        );
    }
    Ok(ModelReport {
        model: "judge".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}
