//! The independent judge (see `mini::judge`), trained as a plain classifier on the judge
//! family's degradations (other kernels, strengths and tints than the reward saw), so that
//! agreeing with the reward is evidence, not an echo.

use super::{batch, fit, mkdir, save_vars, vars_of, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::error::Result;
use crate::mini::judge::{recognised, targets, Judge, JudgeConfig, WEIGHTS_FILE};
use crate::mini::{DataConfig, Example, Family};
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor, D};
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

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let dir = layout.judge();
    mkdir(&dir)?;
    let cfg = JudgeConfig::default();
    let vb = Vb::new(Weights::trainable(seed ^ 0x1D6E, DType::F32, dev));
    let judge = Judge::new(cfg.clone(), &vb)?;
    let data = data();
    let clock = Instant::now();
    let final_loss = fit("judge", vars_of(&vb.vars()), steps, 2e-3, |step| {
        let (images, ex) = batch(
            TRAIN_SEED ^ 0x1D6E,
            (step * BATCH) as u64,
            BATCH,
            &data,
            dev,
        )?;
        loss(&judge, &images, &ex, dev)
    })?;
    let (mut quality_right, mut scene_right, mut total) = (0usize, 0usize, 0usize);
    for k in 0..8u64 {
        let (images, ex) = batch(CHECK_SEED ^ 0x1D6E, k * BATCH as u64, BATCH, &data, dev)?;
        let out = judge.forward(&images.detach())?;
        let pred = out.quality.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let truth = quality_labels(&ex);
        quality_right += pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
        let scenes: Vec<_> = ex.iter().map(|e| e.scene.clone()).collect();
        scene_right += recognised(&out, &scenes)?.iter().filter(|&&r| r).count();
        total += ex.len();
    }
    write_json(
        &dir.join(crate::mini::judge::CONFIG_FILE),
        &serde_json::to_value(&cfg).map_err(|e| crate::error::Error::Invalid(e.to_string()))?,
    )?;
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &dir.join(WEIGHTS_FILE),
    )?;
    let mut checks = serde_json::Map::new();
    checks.insert(
        "heldout_degradation_accuracy".into(),
        json!(quality_right as f64 / total as f64),
    );
    checks.insert(
        "heldout_shapes_and_colours_accuracy".into(),
        json!(scene_right as f64 / total as f64),
    );
    Ok(ModelReport {
        model: "judge".into(),
        steps,
        seconds: clock.elapsed().as_secs_f64(),
        final_loss,
        checks,
    })
}
