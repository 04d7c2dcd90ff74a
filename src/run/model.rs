//! Which model a run uses and how it is set up, as data: the model (folder, single file or hub
//! id), LoRAs, textual inversions, a replacement VAE, clip skip and the prompt syntax. Loading
//! it checks each option against the model's family (an option it has no place for is
//! refused by name).

use crate::error::{Error, Result};
use crate::prompt_syntax::PromptSyntax;
use crate::Pipeline;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelPlan {
    /// A diffusers folder, an original single file, or a hub id in the local cache.
    pub model: String,
    /// Never touch the network.
    #[serde(default)]
    pub offline: bool,
    /// For single files: a diffusers-style folder whose configs replace the inferred ones.
    #[serde(default)]
    pub model_config: Option<PathBuf>,
    /// For single files: epsilon or v_prediction (inferred otherwise).
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// LoRAs merged at load, `FILE` or `FILE:SCALE`.
    #[serde(default)]
    pub loras: Vec<String>,
    /// Textual inversions prompts may use by name, `NAME=FILE` or `FILE`.
    #[serde(default)]
    pub embeddings: Vec<String>,
    #[serde(default)]
    pub prompt_syntax: PromptSyntax,
    /// A diffusers `AutoencoderKL` folder to decode with instead of the model's.
    #[serde(default)]
    pub vae: Option<PathBuf>,
    #[serde(default)]
    pub clip_skip: usize,
    /// The prompt length in tokens where the pipeline takes one (PixArt: 120 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<usize>,
    /// A file of prompt encodings read and extended (PixArt: T5 is then loaded only for a
    /// prompt not in it). It changes no image, so it is not among [`Self::options`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_cache: Option<PathBuf>,
}

impl ModelPlan {
    /// A plan of the model alone, every option at its default.
    pub fn of(model: &str) -> Self {
        Self {
            model: model.to_string(),
            ..Default::default()
        }
    }

    /// The options besides the model that change its images, as `key=value` lines (empty when
    /// all are at their defaults): recorded in an evaluation's manifest.
    pub fn options(&self) -> Vec<String> {
        let mut v: Vec<String> = self.loras.iter().map(|l| format!("lora={l}")).collect();
        v.extend(self.embeddings.iter().map(|e| format!("embedding={e}")));
        if let Some(vae) = &self.vae {
            v.push(format!("vae={}", vae.display()));
        }
        if self.clip_skip != 0 {
            v.push(format!("clip_skip={}", self.clip_skip));
        }
        if self.prompt_syntax != PromptSyntax::Plain {
            v.push("prompt_syntax=a1111".into());
        }
        if let Some(n) = self.max_sequence_length {
            v.push(format!("max_sequence_length={n}"));
        }
        v
    }

    /// The files besides the model that change its images, by role: LoRAs, textual
    /// inversions, the VAE, a single file's config folder.
    pub fn files(&self) -> Result<Vec<(&'static str, PathBuf)>> {
        let mut v = vec![];
        for spec in &self.loras {
            let (file, _) = crate::lora::parse_spec(spec).map_err(Error::Invalid)?;
            v.push(("lora", file));
        }
        for spec in &self.embeddings {
            v.push((
                "textual inversion",
                crate::embedding::textual_inversion::parse_spec(spec).1,
            ));
        }
        v.extend(self.vae.iter().map(|p| ("vae", p.clone())));
        v.extend(
            self.model_config
                .iter()
                .map(|p| ("model config", p.clone())),
        );
        Ok(v)
    }

    /// Loads the model with every option of the plan.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Pipeline> {
        let loras = self
            .loras
            .iter()
            .map(|s| {
                let (file, scale) = crate::lora::parse_spec(s).map_err(Error::Invalid)?;
                crate::lora::Lora::load(&file, scale)
            })
            .collect::<Result<Vec<_>>>()?;
        let options = crate::source::LoadOptions {
            offline: self.offline,
            single_file: crate::single_file::Overrides {
                config_dir: self.model_config.clone(),
                prediction_type: self.prediction_type.clone(),
            },
            loras,
        };
        let mut sd = crate::source::load(&self.model, &options, dtype, device)?;
        if let Some(vae) = &self.vae {
            sd.replace_vae(vae)?;
        }
        if self.clip_skip != 0 {
            sd.set_clip_skip(self.clip_skip)?;
        }
        if let Some(n) = self.max_sequence_length {
            sd.set_max_length(n)?;
        }
        if let Some(f) = &self.text_cache {
            sd.set_text_cache(f)?;
        }
        sd.set_prompt_syntax(self.prompt_syntax)?;
        for spec in &self.embeddings {
            use crate::embedding::textual_inversion::{parse_spec, TextualInversion};
            let (name, file) = parse_spec(spec);
            let ti = TextualInversion::load(&file, &name)?;
            sd.add_textual_inversion(ti, &file)?;
        }
        Ok(sd)
    }
}
