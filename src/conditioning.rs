//! A prompt's encoding as named parts, named as diffusers' pipelines name their arguments:
//! `prompt_embeds` `[b, L, D]` always, `pooled_prompt_embeds` `[b, P]` (SDXL) and
//! `prompt_attention_mask` `[b, L]` (PixArt, LTX). A negative is the same value, its parts
//! prefixed `negative_`. This module names the parts, sorts a file's tensors into them, and
//! does what the pipeline and training do to the value as a whole (batching, detaching, the
//! floating parts an optimiser learns); the families' encoders make it and their denoisers
//! read it.

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

    /// Whether training learns this part (every floating part; a mask stays as it is).
    pub fn is_learned(self) -> bool {
        self != Part::Mask
    }
}

/// The shape of one prompt's conditioning (batch 1) as a family's encoder makes it, and so
/// what a negative for that family must be: `tokens` x `width` embeddings, a pooled part
/// `pooled` wide, a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub tokens: usize,
    pub width: usize,
    pub pooled: Option<usize>,
    pub mask: bool,
}

impl Shape {
    /// Embeddings alone (SD 1.x/2.x, ModelScope).
    pub fn embeds(tokens: usize, width: usize) -> Self {
        Self {
            tokens,
            width,
            pooled: None,
            mask: false,
        }
    }
}

/// A conditioning: the embeddings, and the pooled embedding and the attention mask where
/// the family has them. Every part has the same batch size (axis 0).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub embeds: Tensor,
    pub pooled: Option<Tensor>,
    pub mask: Option<Tensor>,
}

impl From<Tensor> for Conditioning {
    /// A conditioning of embeddings alone (SD 1.x/2.x, ModelScope).
    fn from(embeds: Tensor) -> Self {
        Self {
            embeds,
            pooled: None,
            mask: None,
        }
    }
}

impl Conditioning {
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

    /// The parts present, in [`Part::ALL`]'s order.
    pub fn parts(&self) -> Vec<(Part, &Tensor)> {
        let mut v = vec![(Part::Embeds, &self.embeds)];
        v.extend(self.pooled.iter().map(|t| (Part::Pooled, t)));
        v.extend(self.mask.iter().map(|t| (Part::Mask, t)));
        v
    }

    /// Each part mapped by `f` (which is told the part).
    pub fn map(&self, mut f: impl FnMut(Part, &Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            embeds: f(Part::Embeds, &self.embeds)?,
            pooled: self
                .pooled
                .as_ref()
                .map(|t| f(Part::Pooled, t))
                .transpose()?,
            mask: self.mask.as_ref().map(|t| f(Part::Mask, t)).transpose()?,
        })
    }

    /// The batch size.
    pub fn batch_size(&self) -> Result<usize> {
        Ok(self.embeds.dim(0)?)
    }

    /// A batch-1 conditioning repeated for a batch of `n` (a broadcast view: the negative's
    /// gradient sums over the batch).
    pub fn repeat(&self, n: usize) -> Result<Self> {
        self.map(|_, t| {
            let mut dims = t.dims().to_vec();
            dims[0] = n;
            Ok(t.broadcast_as(dims)?)
        })
    }

    /// The parts without their graphs.
    pub fn detach(&self) -> Self {
        self.map(|_, t| Ok(t.detach())).expect("detach cannot fail")
    }

    /// Every part contiguous in memory.
    pub fn contiguous(&self) -> Result<Self> {
        self.map(|_, t| Ok(t.contiguous()?))
    }

    /// Rows `start..start + len` of the batch.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|_, t| Ok(t.narrow(0, start, len)?))
    }

    /// Conditionings of one shape concatenated along the batch. All must have the same
    /// parts; the family's encoder first makes their lengths equal where its prompts can
    /// differ in length (`PromptEncoder::batch`).
    pub fn cat(all: &[&Conditioning]) -> Result<Self> {
        let first = all
            .first()
            .ok_or_else(|| Error::Invalid("no conditioning to concatenate".into()))?;
        let same = |a: &Option<Tensor>, b: &Option<Tensor>| a.is_some() == b.is_some();
        if all
            .iter()
            .any(|c| !same(&c.pooled, &first.pooled) || !same(&c.mask, &first.mask))
        {
            return Err(Error::Invalid(
                "conditionings with different parts cannot be batched (a negative for another model family?)".into(),
            ));
        }
        let cat = |get: &dyn Fn(&Conditioning) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            let ts: Vec<&Tensor> = all.iter().filter_map(|c| get(c)).collect();
            Ok(if ts.is_empty() {
                None
            } else {
                Some(Tensor::cat(&ts, 0)?)
            })
        };
        Ok(Self {
            embeds: cat(&|c| Some(&c.embeds))?.expect("every conditioning has embeddings"),
            pooled: cat(&|c| c.pooled.as_ref())?,
            mask: cat(&|c| c.mask.as_ref())?,
        })
    }

    /// The parts training learns (every floating part), in [`Part::ALL`]'s order.
    pub fn learned(&self) -> Vec<(Part, &Tensor)> {
        self.parts()
            .into_iter()
            .filter(|(p, _)| p.is_learned())
            .collect()
    }

    /// This conditioning with its learned parts replaced by `learned` (in [`Self::learned`]'s
    /// order: what an optimiser or a gradient gives back); the mask is kept.
    pub fn with_learned(&self, learned: &[Tensor]) -> Result<Self> {
        let want = self.learned().len();
        if learned.len() != want {
            return Err(Error::Invalid(format!(
                "{} tensors for a conditioning with {want} learned parts",
                learned.len()
            )));
        }
        let mut it = learned.iter();
        self.map(|p, t| {
            Ok(if p.is_learned() {
                it.next().expect("counted").clone()
            } else {
                t.clone()
            })
        })
    }
}
