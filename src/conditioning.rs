//! A prompt's encoding as named parts, named as diffusers' pipelines name their arguments:
//! `prompt_embeds` `[b, L, D]` always, `pooled_prompt_embeds` `[b, P]` (SDXL) and
//! `prompt_attention_mask` `[b, L]` (PixArt, LTX). A negative is the same value, its parts
//! prefixed `negative_`. This module names the parts and sorts a file's tensors into them;
//! the families' encoders and the pipeline take the value as they arrive (issue 30).

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// One part of a conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Embeds,
    Pooled,
    Mask,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Embeds, Part::Pooled, Part::Mask];

    /// diffusers' argument name, for the prompt or (`negative`) the negative.
    pub fn name(self, negative: bool) -> &'static str {
        match (self, negative) {
            (Part::Embeds, false) => "prompt_embeds",
            (Part::Pooled, false) => "pooled_prompt_embeds",
            (Part::Mask, false) => "prompt_attention_mask",
            (Part::Embeds, true) => "negative_prompt_embeds",
            (Part::Pooled, true) => "negative_pooled_prompt_embeds",
            (Part::Mask, true) => "negative_prompt_attention_mask",
        }
    }

    /// The part a tensor name stands for (with or without `negative_`).
    pub fn of_name(name: &str) -> Option<Part> {
        Part::ALL
            .into_iter()
            .find(|p| name == p.name(true) || name == p.name(false))
    }
}

/// The parts of a negative: the embeddings, and the pooled embedding and the attention mask
/// where the family has them.
#[derive(Debug, Clone)]
pub struct Parts {
    pub embeds: Tensor,
    pub pooled: Option<Tensor>,
    pub mask: Option<Tensor>,
}

impl Parts {
    /// Sorts named tensors (a file's) into parts; a name that is no part is refused by name,
    /// as is a file without the embeddings.
    pub fn from_named(tensors: HashMap<String, Tensor>, source: &Path) -> Result<Self> {
        let mut found: HashMap<&'static str, Tensor> = HashMap::new();
        for (name, t) in tensors {
            let Some(part) = Part::of_name(&name) else {
                return Err(Error::file(
                    source,
                    format!(
                        "holds a tensor named {name}; a negative's parts are named {}",
                        Part::ALL.map(|p| p.name(true)).join(", ")
                    ),
                ));
            };
            if found.insert(part.name(true), t).is_some() {
                return Err(Error::file(
                    source,
                    format!(
                        "holds {} twice (with and without negative_)",
                        part.name(true)
                    ),
                ));
            }
        }
        let embeds = found.remove(Part::Embeds.name(true)).ok_or_else(|| {
            Error::file(
                source,
                "holds no negative_prompt_embeds; every negative has its embeddings",
            )
        })?;
        Ok(Self {
            embeds,
            pooled: found.remove(Part::Pooled.name(true)),
            mask: found.remove(Part::Mask.name(true)),
        })
    }
}
