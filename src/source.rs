//! Where a model comes from: a diffusers folder, an original single-file checkpoint, or a
//! Hugging Face repo id resolved in the standard local hub cache (never over the network).

use crate::error::{Error, Result};
use crate::single_file::{self, Overrides};
use crate::Pipeline;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// How to load a model besides its location.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Never use the network (also implied by HF_HUB_OFFLINE=1). This build never downloads,
    /// so the flag only changes the advice given when a model is missing.
    pub offline: bool,
    /// Overrides for single-file checkpoints (see [`single_file::Overrides`]).
    pub single_file: Overrides,
    /// LoRAs merged into the UNet and text encoder at load.
    pub loras: Vec<crate::lora::Lora>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Folder(PathBuf),
    SingleFile(PathBuf),
}

/// The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `spec` to a local folder or file.
pub fn resolve(spec: &str, options: &LoadOptions) -> Result<ModelSource> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelSource::Folder(path.to_path_buf()));
    }
    if path.is_file() {
        return match path.extension().and_then(|e| e.to_str()) {
            // Pickles are read by the safe reader (tensors only, never code).
            Some("safetensors" | "ckpt" | "pt" | "bin" | "pth") => {
                Ok(ModelSource::SingleFile(path.to_path_buf()))
            }
            _ => Err(Error::file(
                path,
                "not a model: pass a diffusers folder, a .safetensors checkpoint or a hub repo id",
            )),
        };
    }
    if looks_like_repo_id(spec) {
        let offline = options.offline
            || std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let cache = hub_cache_dir().ok_or_else(|| {
            Error::Invalid(format!(
                "{spec}: no Hugging Face cache folder (set HF_HUB_CACHE or HOME)"
            ))
        })?;
        let repo = hf_hub::Cache::new(cache.clone()).model(spec.to_string());
        if let Some(index) = repo.get("model_index.json") {
            let folder = index.parent().expect("a file has a parent").to_path_buf();
            return Ok(ModelSource::Folder(folder));
        }
        let how = if offline {
            "offline mode is on"
        } else {
            "this build does not download"
        };
        return Err(Error::Invalid(format!(
            "{spec}: not in the local Hugging Face cache ({}) and {how}; fetch it with `huggingface-cli download {spec}` (diffusers layout) or pass a local folder",
            cache.display()
        )));
    }
    Err(Error::file(path, "model folder not found"))
}

/// Resolves and loads a model.
pub fn load(spec: &str, options: &LoadOptions, dtype: DType, device: &Device) -> Result<Pipeline> {
    match resolve(spec, options)? {
        ModelSource::Folder(dir) => {
            // A VideoCrafter folder (lvdm's checkpoint and yaml) has no model_index.json.
            use crate::family::videocrafter::{load, Files};
            if !dir.join("model_index.json").is_file() {
                if let Some(files) = Files::of_folder(&dir)? {
                    let all = crate::model_file::read(&files.checkpoint)?;
                    return load(&files, all, dtype, device, &options.loras);
                }
            }
            Pipeline::load_with_loras(&dir, dtype, device, &options.loras)
        }
        ModelSource::SingleFile(file) => {
            single_file::load_with_loras(&file, &options.single_file, dtype, device, &options.loras)
        }
    }
}
