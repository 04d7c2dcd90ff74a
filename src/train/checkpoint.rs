//! Training checkpoints: the embedding, AdamW's moments, the step and the resolved config in
//! one safetensors file, written atomically (a killed writer leaves the previous one intact).

use super::optim::{AdamW, AdamWConfig};
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub embedding: Tensor,
    pub optimizer: AdamW,
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
        let meta: HashMap<String, String> = [
            ("step", self.step.to_string()),
            ("adam_step", self.optimizer.step.to_string()),
            ("bad_in_row", self.bad_in_row.to_string()),
            (
                "loss_scaler",
                serde_json::to_string(&self.loss_scaler).unwrap_or_default(),
            ),
            (
                "adam",
                serde_json::to_string(&self.optimizer.cfg).unwrap_or_default(),
            ),
            ("config", self.config.clone()),
            ("tool", format!("reneg {}", env!("CARGO_PKG_VERSION"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let tensors = [
            ("embedding", &self.embedding),
            ("adam_m", &self.optimizer.m),
            ("adam_v", &self.optimizer.v),
        ];
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
        Ok(Self {
            embedding: t("embedding")?,
            optimizer: AdamW {
                cfg,
                m: t("adam_m")?,
                v: t("adam_v")?,
                step: num("adam_step")?,
            },
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
