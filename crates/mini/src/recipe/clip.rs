//! The tiny CLIP: a transformers `CLIPModel` trained contrastively on captions and images
//! (clean and degraded, captions with and without quality words). Its text tower becomes the
//! generator's text encoder; the whole model is also usable as a CLIP-score reward.

use super::{batch, fit, mkdir, save_vars, token_ids_trimmed, write_json, Layout, ModelReport};
use super::{CHECK_SEED, TRAIN_SEED};
use crate::{vocab, DataConfig};
use candle_core::{DType, Device, Tensor, D};
use reneg::error::Result;
use reneg::reward::hf_clip::HfClipModel;
use reneg::reward::preprocess::Preprocess;
use reneg::tokenizer::ClipTokenizer;
use reneg::weights::{Vb, Weights};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

pub const WIDTH: usize = 64;
const BATCH: usize = 64;

/// The text tower's config (also the pipeline's `text_encoder/config.json`, as a
/// `CLIPTextModel`).
pub fn text_config() -> Value {
    let v = vocab::vocab_size();
    json!({
        "model_type": "clip_text_model",
        "vocab_size": v, "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": WIDTH,
        "bos_token_id": v - 2, "eos_token_id": v - 1, "pad_token_id": v - 1,
    })
}

fn config() -> Value {
    json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": WIDTH,
        "logit_scale_init_value": (1.0f64 / 0.07).ln(),
        "text_config": text_config(),
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": 3,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 4, "num_channels": 3,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": WIDTH,
        },
    })
}

pub fn train(layout: &Layout, seed: u64, steps: usize, dev: &Device) -> Result<ModelReport> {
    let dir = layout.clip();
    mkdir(&dir)?;
    vocab::write_tokenizer(&dir)?;
    let cfg_path = dir.join("config.json");
    write_json(&cfg_path, &config())?;
    let tok = ClipTokenizer::from_dir(&dir)?;
    let vb = Vb::new(Weights::trainable(seed ^ 0xC11F, DType::F32, dev));
    let model = HfClipModel::new(&cfg_path, &vb)?;
    let logit_scale = vb.get(&[], "logit_scale")?;
    let pre = Preprocess::clip(32);
    // CLIP learns from whole-scene captions only ("..., blurry"): its contrastive loss pairs
    // each image with one caption, and a bare "blurry" would match every blurred image of the
    // batch. (This is also the data of the world's first version, whose CLIP the second keeps.)
    let data = DataConfig {
        quality_only_share: 0.0,
        quality_mostly_share: 0.0,
        ..DataConfig::default()
    };
    let clock = Instant::now();

    let logits = |start: u64, data_seed: u64| -> Result<Tensor> {
        let (images, ex) = batch(data_seed, start, BATCH, &data, dev)?;
        let captions: Vec<String> = ex.iter().map(|e| e.caption.clone()).collect();
        let img = model.image_embeds(&pre.forward(&images)?)?;
        let txt = model.text_embeds(&token_ids_trimmed(&tok, &captions, dev)?)?;
        let scale = logit_scale.clamp(0.0, 100f64.ln())?.exp()?;
        Ok(img.matmul(&txt.t()?)?.broadcast_mul(&scale)?)
    };
    let labels = Tensor::arange(0u32, BATCH as u32, dev)?;
    let fitted = fit(
        "clip",
        vb.vars(),
        steps,
        2e-3,
        &super::checkpoint_path(layout, "clip"),
        |step| {
            let l = logits((step * BATCH) as u64, TRAIN_SEED)?;
            let a = candle_nn::loss::cross_entropy(&l, &labels)?;
            let b = candle_nn::loss::cross_entropy(&l.t()?, &labels)?;
            Ok(((a + b)? * 0.5)?)
        },
    )?;

    // Held-out retrieval: is each image's own caption its best match in a batch of 64?
    let mut hits = 0usize;
    for k in 0..4u64 {
        let l = logits(k * BATCH as u64, CHECK_SEED)?.detach();
        let best = l.argmax(D::Minus1)?.to_vec1::<u32>()?;
        hits += best
            .iter()
            .enumerate()
            .filter(|(i, &b)| *i as u32 == b)
            .count();
    }
    let accuracy = hits as f64 / (4 * BATCH) as f64;

    let vars = vb.vars();
    save_vars(
        &vars,
        |n| Some(n.to_string()),
        HashMap::new(),
        &dir.join("model.safetensors"),
    )?;
    // The text tower alone is the pipeline's text encoder (a CLIPTextModel).
    let te = layout.pipeline().join("text_encoder");
    mkdir(&te)?;
    let mut te_cfg = text_config();
    te_cfg["architectures"] = json!(["CLIPTextModel"]);
    write_json(&te.join("config.json"), &te_cfg)?;
    save_vars(
        &vars,
        |n| n.starts_with("text_model.").then(|| n.to_string()),
        HashMap::new(),
        &te.join("model.safetensors"),
    )?;
    vocab::write_tokenizer(&layout.pipeline().join("tokenizer"))?;
    let mut checks = serde_json::Map::new();
    checks.insert("heldout_retrieval_top1_of_64".into(), json!(accuracy));
    Ok(ModelReport {
        model: "clip".into(),
        steps,
        seconds: fitted.earlier_seconds + clock.elapsed().as_secs_f64(),
        final_loss: fitted.final_loss,
        checks,
    })
}
