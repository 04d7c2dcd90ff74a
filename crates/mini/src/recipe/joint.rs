//! The pipeline's UNet and text encoder, fine-tuned together (the fourth world,
//! `docs/mini-world-v4.md`). The CLIP's text tower, trained only to match captions to images
//! among 64, all but erases the words a generator needs to place a shape: swapping "on the
//! left" for "on the right" moves its features by about 2% of what swapping a colour does, so
//! the base UNet, trained on it frozen, draws shapes where the noise puts them. Here the text
//! encoder (starting from that tower) and the UNet (from the base UNet) learn the noise
//! prediction together, as fine-tunes that train the text encoder do, while the text encoder
//! also learns to parse its captions: a linear probe on its pooled output names the shape at
//! each of the five positions. The noise loss alone did not move it (a pilot of 200 steps:
//! the position-word distance went from 1.72 to 1.49): a UNet that ignores a feature gives
//! the encoder no reason to grow it, and an encoder without it gives the UNet nothing to
//! follow. The reward keeps its own CLIP, so the generator's text features and the reward's
//! are two models, as in SD. The stage also moves the pipeline from SD's schedule to zero
//! terminal SNR with v-prediction ([`super::unet::zero_snr_scheduler_config`]): on SD's, the
//! 16x16 latent's layout is still legible at t = 999, so the UNet placed shapes where the
//! seed's noise leaned whatever the text said (docs/mini-world-v4.md, diagnosis point 4).

use super::unet::{Noised, Noiser};
use super::{fit, mkdir, save_vars, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::{example, DataConfig, Scene};
use candle_core::{DType, Device, Tensor};
use reneg::error::Result;
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::rng::SplitMix64;
use reneg::tokenizer::ClipTokenizer;
use reneg::weights::{Vb, Weights};
use serde_json::json;
use std::collections::HashMap;
use std::time::Instant;

const BATCH: usize = 32;
/// Half the base UNet's rate: both models start trained.
const LR: f64 = 5e-4;
/// The fine-tune reads examples from this index of the UNet's dataset on, past the base
/// UNet's 345,600, so it sees scenes it has not been trained on image for image.
const FIRST_EXAMPLE: u64 = 1 << 32;
/// The parse loss's weight: its cross-entropy starts near 5 ln 4 = 6.9 and the noise loss
/// near 0.05, and Adam's steps do not depend on a loss's scale, only on which loss dominates
/// a parameter's gradient; at 0.01 the two start comparable in the text encoder.
const PARSE_WEIGHT: f64 = 0.01;
/// The probe's classes at each position: nothing, or one of the shape kinds.
const PARSE_CLASSES: usize = 1 + crate::scene::SHAPES.len();

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let root = layout.pipeline();
    let clip_file = layout.clip().join("model.safetensors");
    let scheduler = super::unet::zero_snr_scheduler_config();
    let noiser = Noiser::load(&root, &clip_file, &scheduler, dev)?;
    let te_cfg = ClipTextConfig::load(&root.join("text_encoder/config.json"))?;
    let te_vb = Vb::new(Weights::load(&clip_file, DType::F32, dev)?.into_trainable());
    let text_encoder = ClipTextModel::new(te_cfg.clone(), &te_vb)?;
    let base = layout.unet_base();
    let unet_vb = Vb::new(
        Weights::load(
            &base.join("diffusion_pytorch_model.safetensors"),
            DType::F32,
            dev,
        )?
        .into_trainable(),
    );
    let unet = UNet2DConditionModel::new(UNetConfig::load(&base.join("config.json"))?, &unet_vb)?;
    let tok = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
    let ratio_before = position_to_colour_ratio(&noiser.text_encoder, &tok, dev)?;
    let probe_vb = Vb::new(Weights::trainable(seed ^ 0x9A25E, DType::F32, dev));
    let probe = Probe::new(&probe_vb, te_cfg.hidden_size)?;

    let clock = Instant::now();
    let predict = |b: &Noised| {
        let ctx = text_encoder.forward(&b.ids)?;
        unet.forward_each(&b.xt, &b.ts, &ctx)
    };
    let mut vars = te_vb.vars();
    vars.extend(unet_vb.vars());
    vars.extend(probe_vb.vars());
    let fitted = fit(
        "joint",
        vars,
        steps,
        LR,
        &super::checkpoint_path(layout, "joint"),
        |step| {
            // As the base UNet's: each step's draws come from the step alone (resumable).
            let mut rng = SplitMix64::new((seed ^ 0x101A7).wrapping_add((step as u64) << 32));
            rng.next_u64();
            let start = FIRST_EXAMPLE + (step * BATCH) as u64;
            let b = noiser.batch(TRAIN_SEED, start, BATCH, &mut rng, true)?;
            let ctx = text_encoder.forward(&b.ids)?;
            let noise_loss = (unet.forward_each(&b.xt, &b.ts, &ctx)? - &b.target)?
                .sqr()?
                .mean_all()?;
            let pooled = text_encoder.pooled(&ctx, &b.ids)?;
            match probe.loss(&pooled, &b.captions)? {
                Some(parse) => Ok((noise_loss + (parse * PARSE_WEIGHT)?)?),
                None => Ok(noise_loss),
            }
        },
    )?;
    let heldout = super::unet::heldout_mse(&noiser, |b| Ok(predict(b)?.detach()))?;
    let ratio_after = position_to_colour_ratio(&text_encoder, &tok, dev)?;
    let parse_accuracy = {
        let cfg = DataConfig::default();
        let captions: Vec<String> = (0..128)
            .map(|i| example(CHECK_SEED, i, &cfg).caption)
            .collect();
        let ids = super::token_ids(&tok, &captions, dev)?;
        let pooled = text_encoder.pooled(&text_encoder.forward(&ids)?, &ids)?;
        probe.accuracy(&pooled.detach(), &captions)?
    };

    save_vars(
        &te_vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &root.join("text_encoder/model.safetensors"),
    )?;
    super::unet::write_scheduler(&root, &scheduler)?;
    // The UNet is written last: the recipe takes it as the sign that this stage is done.
    let unet_dir = root.join("unet");
    mkdir(&unet_dir)?;
    write_json(&unet_dir.join("config.json"), &super::unet::config())?;
    save_vars(
        &unet_vb.vars(),
        |n| Some(n.to_string()),
        HashMap::new(),
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let mut checks = serde_json::Map::new();
    checks.insert(
        format!("heldout_{}_mse", noiser.target_name()),
        json!(heldout),
    );
    checks.insert(
        "position_to_colour_feature_change_before".into(),
        json!(ratio_before),
    );
    checks.insert(
        "position_to_colour_feature_change_after".into(),
        json!(ratio_after),
    );
    checks.insert("heldout_parse_accuracy".into(), json!(parse_accuracy));
    Ok(ModelReport {
        model: "joint".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}

/// How much a text encoder's features tell positions apart, against colours: over 32
/// one-shape captions of the held-out-check dataset, the mean distance between the features
/// of a caption and of the same caption with the next position, divided by the mean
/// distance when the colour is the next one instead. The CLIP's tower: about 0.02.
pub(super) fn position_to_colour_ratio(
    te: &ClipTextModel,
    tok: &ClipTokenizer,
    dev: &Device,
) -> Result<f64> {
    let cfg = DataConfig::default();
    let scenes: Vec<Scene> = (0..)
        .map(|i| example(CHECK_SEED, i, &cfg).scene)
        .filter(|s| s.shapes.len() == 1)
        .take(32)
        .collect();
    let variant = |f: &dyn Fn(&mut crate::scene::Shape)| -> Vec<String> {
        scenes
            .iter()
            .map(|s| {
                let mut s = s.clone();
                f(&mut s.shapes[0]);
                s.caption()
            })
            .collect()
    };
    let base = variant(&|_| {});
    let moved = variant(&|s| s.position = (s.position + 1) % crate::scene::POSITIONS.len());
    let recoloured = variant(&|s| s.colour = (s.colour + 1) % crate::scene::COLOURS.len());
    let features = |texts: &[String]| -> Result<Tensor> {
        Ok(te
            .forward(&super::token_ids(tok, texts, dev)?)?
            .detach()
            .flatten_from(1)?)
    };
    let f = features(&base)?;
    let mean_distance = |g: Tensor| -> Result<f64> {
        Ok((&f - g)?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .mean_all()?
            .to_scalar::<f32>()? as f64)
    };
    Ok(mean_distance(features(&moved)?)? / mean_distance(features(&recoloured)?)?)
}

/// The parse probe: from a caption's pooled text features, the shape kind at each of the
/// five positions (or nothing there), as one linear layer. Trained with the text encoder and
/// thrown away after (it is not part of the pipeline).
struct Probe {
    weight: Tensor,
    bias: Tensor,
}

impl Probe {
    fn new(vb: &Vb, hidden: usize) -> Result<Self> {
        let out = crate::scene::POSITIONS.len() * PARSE_CLASSES;
        Ok(Self {
            weight: vb.get(&[out, hidden], "parse_probe.weight")?,
            bias: vb.get(&[out], "parse_probe.bias")?,
        })
    }

    /// Each caption's class at each position, for captions that parse as scenes (not the
    /// dropped, empty ones, nor those made of quality words): `(rows, labels)`.
    fn targets(captions: &[String]) -> (Vec<u32>, Vec<u32>) {
        let (mut rows, mut labels) = (Vec::new(), Vec::new());
        for (i, c) in captions.iter().enumerate() {
            if let Some(scene) = Scene::parse(c) {
                rows.push(i as u32);
                for p in 0..crate::scene::POSITIONS.len() {
                    let class = scene
                        .shapes
                        .iter()
                        .find(|s| s.position == p)
                        .map_or(0, |s| 1 + s.kind as u32);
                    labels.push(class);
                }
            }
        }
        (rows, labels)
    }

    /// `[rows x positions, classes]` logits of the parseable captions' rows of `pooled`.
    fn logits(&self, pooled: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let idx = Tensor::new(rows, pooled.device())?;
        let x = pooled.index_select(&idx, 0)?;
        let l = x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        Ok(l.reshape((rows.len() * crate::scene::POSITIONS.len(), PARSE_CLASSES))?)
    }

    /// Mean cross-entropy over the parseable captions' positions; `None` if none parse.
    fn loss(&self, pooled: &Tensor, captions: &[String]) -> Result<Option<Tensor>> {
        let (rows, labels) = Self::targets(captions);
        if rows.is_empty() {
            return Ok(None);
        }
        let labels = Tensor::new(labels, pooled.device())?;
        Ok(Some(candle_nn::loss::cross_entropy(
            &self.logits(pooled, &rows)?,
            &labels,
        )?))
    }

    /// The share of the parseable captions' positions whose class the probe gets right.
    fn accuracy(&self, pooled: &Tensor, captions: &[String]) -> Result<f64> {
        let (rows, labels) = Self::targets(captions);
        let got = self
            .logits(pooled, &rows)?
            .argmax(1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let hits = got.iter().zip(&labels).filter(|(a, b)| a == b).count();
        Ok(hits as f64 / labels.len().max(1) as f64)
    }
}
