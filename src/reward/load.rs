//! Loading reward models from the files their owners ship.

use super::aesthetic::{AestheticHead, AestheticReward};
use super::hf_clip::{ClipScoring, HfClipModel, HfClipReward};
use super::open_clip::HpsReward;
use super::preprocess::Preprocess;
use super::Reward;
use crate::error::{Error, Result};
use crate::models::clip_vision::{ClipVisionConfig, VisionTower};
use crate::models::open_clip::{OpenClipConfig, OpenClipModel, VIT_H_14};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{Vb, Weights};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RewardKind {
    /// HPSv2 / HPSv2.1 (OpenCLIP ViT-H-14 state dict).
    Hps,
    /// PickScore (transformers CLIPModel folder).
    Pickscore,
    /// LAION aesthetic v2 (CLIPVisionModelWithProjection folder + MLP head).
    Aesthetic,
    /// CLIP score (any transformers CLIPModel folder).
    Clip,
}

/// Reads a state dict from safetensors or a PyTorch file, dropping the wrappers checkpoints
/// add (`state_dict.`, `module.`).
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = crate::io::map_file(path)?;
    let raw = if crate::torch_file::is_zip(&bytes) {
        crate::torch_file::read_state_dict(&bytes, path)?
    } else {
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("not a safetensors or PyTorch file ({e})")))?
    };
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let k = k.strip_prefix("state_dict.").unwrap_or(&k).to_string();
            let k = k.strip_prefix("module.").unwrap_or(&k).to_string();
            (k, v)
        })
        .collect())
}

fn find_file(dir: &Path, names: &[&str], exts: &[&str]) -> Option<PathBuf> {
    for n in names {
        let p = dir.join(n);
        if p.is_file() {
            return Some(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

fn vb_from(t: HashMap<String, Tensor>, file: &Path, dtype: DType, device: &Device) -> Vb {
    Vb::new(Weights::from_tensors(t, file, dtype, device))
}

/// HPS: a folder with `open_clip_config.json` and weights, or a weights file alone (then
/// the ViT-H-14 config, as HPSv2's `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`).
pub fn load_hps(path: &Path, dtype: DType, device: &Device) -> Result<HpsReward> {
    let (cfg, weights) = if path.is_dir() {
        let cfg_path = path.join("open_clip_config.json");
        if !cfg_path.is_file() {
            let hint = if path.join("config.json").is_file() {
                "this looks like a transformers CLIPModel: use --reward pickscore or clip"
            } else {
                "an HPS folder needs open_clip_config.json beside the weights"
            };
            return Err(Error::file(path, hint));
        }
        let w = find_file(
            path,
            &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
            &["safetensors", "pt", "bin"],
        )
        .ok_or_else(|| Error::file(path, "no weights (.safetensors, .pt or .bin) in the folder"))?;
        (OpenClipConfig::load(&cfg_path)?, w)
    } else if path.is_file() {
        let v: serde_json::Value = serde_json::from_str(VIT_H_14).expect("bundled config is valid");
        (
            OpenClipConfig::from_value(v, Path::new("<bundled ViT-H-14 config>"))?,
            path.to_path_buf(),
        )
    } else {
        return Err(Error::file(path, "reward model not found"));
    };
    let t = read_state_dict(&weights)?;
    if !t.contains_key("visual.conv1.weight") {
        return Err(Error::file(
            &weights,
            "not an open_clip CLIP state dict (no visual.conv1.weight); check --reward",
        ));
    }
    let size = cfg.vision_cfg.image_size;
    // open_clip models with their own tokenizer (as open_clip's `hf-hub:` models) carry it
    // in `tokenizer/`; otherwise open_clip's default CLIP vocabulary.
    let tokenizer = if path.join("tokenizer").is_dir() {
        ClipTokenizer::from_dir(&path.join("tokenizer"))?.with_pad_id(0)
    } else {
        ClipTokenizer::open_clip()?
    };
    Ok(HpsReward {
        model: OpenClipModel::new(cfg, &vb_from(t, &weights, dtype, device))?,
        tokenizer,
        preprocess: Preprocess::clip(size),
    })
}

pub fn load_hf_clip(
    path: &Path,
    scoring: ClipScoring,
    dtype: DType,
    device: &Device,
) -> Result<HfClipReward> {
    let cfg = path.join("config.json");
    if !cfg.is_file() {
        let hint = if path.join("open_clip_config.json").is_file() {
            "this is an open_clip model: use --reward hps"
        } else {
            "a CLIPModel folder (config.json, model.safetensors, tokenizer files) is needed"
        };
        return Err(Error::file(path, hint));
    }
    let w = find_file(path, &["model.safetensors"], &["safetensors"])
        .ok_or_else(|| Error::file(path, "no model.safetensors in the folder"))?;
    let vb = Vb::new(Weights::load(&w, dtype, device)?);
    if !vb.contains("vision_model.embeddings.class_embedding") {
        return Err(Error::file(
            &w,
            "not a transformers CLIPModel state dict (no vision_model.*); check --reward",
        ));
    }
    let model = HfClipModel::new(&cfg, &vb)?;
    let has_tok = path.join("tokenizer.json").is_file() || path.join("vocab.json").is_file();
    let tokenizer = if has_tok {
        ClipTokenizer::from_dir(path)?
    } else {
        ClipTokenizer::embedded("<|endoftext|>")?
    };
    let size = model.vision.image_size();
    Ok(HfClipReward {
        model,
        tokenizer,
        preprocess: Preprocess::clip(size),
        scoring,
    })
}

/// Aesthetic: a folder with `clip/` (CLIPVisionModelWithProjection) and optionally a head
/// (`head.safetensors` or a `.pth`); without one, the real LAION head shipped with reneg.
pub fn load_aesthetic(path: &Path, dtype: DType, device: &Device) -> Result<AestheticReward> {
    let clip = if path.join("clip").is_dir() {
        path.join("clip")
    } else {
        path.to_path_buf()
    };
    let cfg_path = clip.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::file(
            path,
            "an aesthetic model folder needs clip/config.json (CLIP ViT-L/14 with projection)",
        ));
    }
    let w = find_file(&clip, &["model.safetensors"], &["safetensors"])
        .ok_or_else(|| Error::file(&clip, "no model.safetensors"))?;
    let vb = Vb::new(Weights::load(&w, dtype, device)?);
    let cfg = ClipVisionConfig::load(&cfg_path)?;
    let vision = VisionTower::new(
        &cfg,
        &vb.pp("vision_model"),
        Some(&vb.pp("visual_projection")),
    )?;
    let head = match find_file(path, &["head.safetensors"], &["pth"]) {
        Some(h) => AestheticHead::from_tensors(&read_state_dict(&h)?, &h, dtype, device)?,
        None => AestheticHead::laion(dtype, device)?,
    };
    if Some(head.input_dim()) != cfg.projection_dim {
        return Err(Error::file(
            path,
            format!(
                "aesthetic head takes {}-wide embeddings but the CLIP model gives {:?}",
                head.input_dim(),
                cfg.projection_dim
            ),
        ));
    }
    Ok(AestheticReward {
        vision,
        head,
        preprocess: Preprocess::clip(cfg.image_size),
    })
}

/// Loads a reward model of `kind` from `path`.
pub fn load(
    kind: RewardKind,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Reward>> {
    if !path.exists() {
        return Err(Error::file(path, "reward model not found"));
    }
    Ok(match kind {
        RewardKind::Hps => Box::new(load_hps(path, dtype, device)?),
        RewardKind::Pickscore => {
            Box::new(load_hf_clip(path, ClipScoring::PickScore, dtype, device)?)
        }
        RewardKind::Clip => Box::new(load_hf_clip(path, ClipScoring::ClipScore, dtype, device)?),
        RewardKind::Aesthetic => Box::new(load_aesthetic(path, dtype, device)?),
    })
}
