//! Training checkpoints: the negative (every part), AdamW's moments for each learned part, the
//! step and the resolved config in one safetensors file, written atomically (a killed writer
//! leaves the previous one intact). The embeddings and their moments keep the names of the
//! checkpoints before parts (`embedding`, `adam_m`, `adam_v`); another part's tensors add its
//! name (`embedding.negative_pooled_prompt_embeds`, `adam_m.negative_pooled_prompt_embeds`).

use super::optim::{AdamW, AdamWConfig};
use crate::conditioning::{Conditioning, Part};
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub embedding: Conditioning,
    /// One per learned part, in [`Conditioning::learned`]'s order; they step together.
    pub optimizer: Vec<AdamW>,
    /// Optimisation steps completed.
    pub step: u64,
    /// Non-finite steps in a row at the time of saving.
    pub bad_in_row: u64,
    /// fp16's dynamic loss scale (off for other precisions).
    pub loss_scaler: crate::precision::LossScaler,
    /// The run's config as TOML, to refuse resuming a different run.
    pub config: String,
}

impl Checkpoint {
    pub fn save(&self, path: &Path) -> Result<()> {
        let first = self
            .optimizer
            .first()
            .ok_or_else(|| Error::Invalid("a checkpoint without optimiser state".into()))?;
        let meta: HashMap<String, String> = [
            ("step", self.step.to_string()),
            ("adam_step", first.step.to_string()),
            ("bad_in_row", self.bad_in_row.to_string()),
            (
                "loss_scaler",
                serde_json::to_string(&self.loss_scaler).unwrap_or_default(),
            ),
            (
                "adam",
                serde_json::to_string(&first.cfg).unwrap_or_default(),
            ),
            ("config", self.config.clone()),
            ("tool", format!("reneg {}", env!("CARGO_PKG_VERSION"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut tensors: Vec<(String, &Tensor)> = self
            .embedding
            .parts()
            .into_iter()
            .map(|(p, t)| (name("embedding", p), t))
            .collect();
        for ((p, _), opt) in self.embedding.learned().into_iter().zip(&self.optimizer) {
            tensors.push((name("adam_m", p), &opt.m));
            tensors.push((name("adam_v", p), &opt.v));
        }
        let tensors: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let bytes = crate::io::safetensors_f32(&tensors, meta, "checkpoint")?;
        crate::io::write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::file(path, format!("cannot read checkpoint: {e}")))?;
        let bad = |m: String| {
            Error::file(
                path,
                format!("corrupt checkpoint: {m}; delete it to start over"),
            )
        };
        let (tensors, meta) = crate::io::read_safetensors_meta(&bytes, bad)?;
        let get = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("no `{k}`")));
        let num =
            |k: &str| -> Result<u64> { get(k)?.parse().map_err(|_| bad(format!("bad `{k}`"))) };
        let t = |k: &str| {
            tensors
                .get(k)
                .cloned()
                .ok_or_else(|| bad(format!("no tensor `{k}`")))
        };
        let cfg: AdamWConfig =
            serde_json::from_str(&get("adam")?).map_err(|e| bad(e.to_string()))?;
        let part = |p: Part| tensors.get(&name("embedding", p)).cloned();
        let embedding = Conditioning {
            embeds: t("embedding")?,
            pooled: part(Part::Pooled),
            mask: part(Part::Mask),
        };
        let adam_step = num("adam_step")?;
        let optimizer = embedding
            .learned()
            .into_iter()
            .map(|(p, _)| {
                Ok(AdamW {
                    cfg: cfg.clone(),
                    m: t(&name("adam_m", p))?,
                    v: t(&name("adam_v", p))?,
                    step: adam_step,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embedding,
            optimizer,
            step: num("step")?,
            bad_in_row: num("bad_in_row")?,
            // Checkpoints from before loss scaling: no scaling.
            loss_scaler: match meta.get("loss_scaler") {
                Some(s) => serde_json::from_str(s).map_err(|e| bad(e.to_string()))?,
                None => Default::default(),
            },
            config: get("config")?,
        })
    }
}

/// A part's tensor name: `base` for the embeddings, `base.<negative part name>` for another.
fn name(base: &str, part: Part) -> String {
    match part {
        Part::Embeds => base.to_string(),
        p => format!("{base}.{}", p.name(true)),
    }
}
