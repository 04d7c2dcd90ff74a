//! The preference reward: an open_clip `CLIP` (HPSv2's layout: `open_clip_config.json`,
//! `open_clip_model.safetensors`, here with its own `tokenizer/`) trained Bradley-Terry style
//! on two kinds of pairs: a clean image over a degraded copy of it (the reward family's
//! degradations) under the same caption, and an image over another scene's image under the
//! first one's caption. It is scored as HPS is: 100 x cosine.

use super::{fit, mkdir, save_vars, token_ids_trimmed, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::{preference_pair, vocab, Family};
use candle_core::{DType, Device, Tensor};
use reneg::error::Result;
use reneg::models::open_clip::{OpenClipConfig, OpenClipModel};
use reneg::reward::open_clip::HpsReward;
use reneg::reward::preprocess::Preprocess;
use reneg::tokenizer::ClipTokenizer;
use reneg::weights::{Vb, Weights};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

const PAIRS: usize = 32;
/// Cosine differences are scaled by this before the logistic loss (HPS's logit scale is
/// near 100; a smaller one keeps the tiny model's cosines from saturating early).
const SCALE: f64 = 20.0;

pub fn config() -> Value {
    json!({
        "embed_dim": 64, "quick_gelu": false,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3,
                        "head_width": 16, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 77, "vocab_size": vocab::vocab_size(), "width": 64,
                      "heads": 4, "layers": 3},
    })
}

/// Pairs `start..start + PAIRS`: images `[2 * PAIRS, 3, 32, 32]` (winners, then losers) and
/// captions (each winner's, for both members of its pair). Even pairs: clean over degraded;
/// odd pairs: the scene over the next pair's scene.
fn pairs(seed: u64, start: u64, dev: &Device) -> Result<(Tensor, Vec<String>)> {
    let drawn: Vec<_> = (start..start + PAIRS as u64 + 1)
        .map(|i| preference_pair(seed, i, 32, Family::Reward))
        .collect();
    let mut win: Vec<f32> = Vec::new();
    let mut lose: Vec<f32> = Vec::new();
    let mut captions = Vec::new();
    for i in 0..PAIRS {
        let (scene, clean, bad, _) = &drawn[i];
        win.extend(clean);
        if (start as usize + i).is_multiple_of(2) {
            lose.extend(bad);
        } else {
            lose.extend(&drawn[i + 1].1);
        }
        captions.push(scene.caption());
    }
    win.extend(lose);
    let images = Tensor::from_vec(win, (2 * PAIRS, 3, 32, 32), dev)?;
    let both = [captions.clone(), captions].concat();
    Ok((images, both))
}

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let dir = layout.reward();
    mkdir(&dir)?;
    vocab::write_tokenizer(&dir.join("tokenizer"))?;
    let cfg_path = dir.join("open_clip_config.json");
    write_json(&cfg_path, &config())?;
    let vb = Vb::new(Weights::trainable(seed ^ 0x4E3A, DType::F32, dev));
    let reward = HpsReward {
        model: OpenClipModel::new(OpenClipConfig::load(&cfg_path)?, &vb)?,
        tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?.with_pad_id(0),
        preprocess: Preprocess::clip(32),
    };
    let clock = Instant::now();
    // Per pair: the winner's cosine minus the loser's.
    let margins = |seed: u64, start: u64| -> Result<Tensor> {
        let (images, captions) = pairs(seed, start, dev)?;
        let ids = token_ids_trimmed(&reward.tokenizer, &captions, dev)?;
        let sim = reward.similarity(&reward.preprocess.forward(&images)?, &ids)?;
        Ok((sim.narrow(0, 0, PAIRS)? - sim.narrow(0, PAIRS, PAIRS)?)?)
    };
    let fitted = fit(
        "reward",
        vb.vars(),
        steps,
        1e-3,
        &super::checkpoint_path(layout, "reward"),
        |step| {
            let m = margins(TRAIN_SEED, (step * PAIRS) as u64)?;
            // -log sigmoid(s m) = softplus(-s m), written stably.
            let x = (m * -SCALE)?;
            Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?)
        },
    )?;
    let (mut quality, mut align) = (0usize, 0usize);
    let rounds = 8u64;
    for k in 0..rounds {
        let start = k * PAIRS as u64;
        let m = margins(CHECK_SEED, start)?.detach().to_vec1::<f32>()?;
        for (i, v) in m.iter().enumerate() {
            let right = usize::from(*v > 0.0);
            if (start as usize + i).is_multiple_of(2) {
                quality += right;
            } else {
                align += right;
            }
        }
    }
    let half = (rounds as usize * PAIRS / 2) as f64;
    // open_clip state dicts carry the logit scale; HPS scores do not use it.
    let extra = HashMap::from([(
        "logit_scale".to_string(),
        Tensor::new((1.0f32 / 0.07).ln(), dev)?,
    )]);
    save_vars(
        &vb.vars(),
        |n| Some(n.to_string()),
        extra,
        &dir.join("open_clip_model.safetensors"),
    )?;
    let mut checks = serde_json::Map::new();
    checks.insert(
        "heldout_clean_over_degraded".into(),
        json!(quality as f64 / half),
    );
    checks.insert(
        "heldout_caption_alignment".into(),
        json!(align as f64 / half),
    );
    Ok(ModelReport {
        model: "reward".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}
