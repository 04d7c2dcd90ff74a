//! The global ReNeg training loop: AdamW with cosine decay on the negative embedding, batches
//! by gradient accumulation, non-finite steps skipped, checkpoints, validation, metrics.
//! Every random draw of step `s` is derived from (seed, s), so a resumed run ends with the
//! same embedding, bit for bit, as an uninterrupted one.

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::optim::{cosine_lr, AdamW, AdamWConfig};
use super::step::{reneg_gradient, sampled_reward, Objective, Sampling};
use crate::embedding::NegativeEmbedding;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::StableDiffusion;
use candle_core::{DType, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// The update was skipped (non-finite loss or gradient).
    pub skipped: bool,
}

/// One line of `validation.jsonl`: mean reward on the validation prompts, fixed seeds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Validation {
    pub step: u64,
    pub null_text: f64,
    pub embedding: f64,
}

/// What a finished run returns.
pub struct TrainOutcome {
    pub embedding: Tensor,
    pub steps_done: u64,
    pub skipped: u64,
    pub last_validation: Option<Validation>,
}

/// The files of a run.
pub struct RunPaths {
    pub out: PathBuf,
}

impl RunPaths {
    pub fn checkpoint(&self) -> PathBuf {
        self.out.join("checkpoint.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }
    pub fn validation(&self) -> PathBuf {
        self.out.join("validation.jsonl")
    }
    pub fn embedding(&self) -> PathBuf {
        self.out.join("embedding.safetensors")
    }
    pub fn embedding_bin(&self) -> PathBuf {
        self.out.join("embedding.bin")
    }
    pub fn config(&self) -> PathBuf {
        self.out.join("config.toml")
    }
    pub fn curve(&self) -> PathBuf {
        self.out.join("reward_curve.png")
    }
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    r.next_u64()
}

/// Keeps the lines of a JSONL file whose `step` is below `step` (after a resume).
fn truncate_jsonl(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s < step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes())
}

fn append_jsonl<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    writeln!(f, "{}", serde_json::to_string(value).unwrap_or_default())
        .map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

/// Saves the embedding (safetensors with metadata, and a torch-loadable .bin).
pub fn save_embedding(emb: &Tensor, cfg: &TrainConfig, steps: u64, paths: &RunPaths) -> Result<()> {
    let mut e = NegativeEmbedding::new(emb.clone())?;
    e.metadata.insert("base_model".into(), cfg.model.clone());
    let rewards: Vec<String> = cfg
        .rewards
        .iter()
        .map(|r| format!("{:?}:{}:{}", r.kind, r.model.display(), r.weight).to_lowercase())
        .collect();
    e.metadata.insert("reward".into(), rewards.join(","));
    e.metadata.insert("steps".into(), steps.to_string());
    e.metadata.insert("lr".into(), cfg.lr.to_string());
    e.metadata.insert(
        "tool".into(),
        format!("reneg {}", env!("CARGO_PKG_VERSION")),
    );
    e.save_safetensors(&paths.embedding())?;
    e.save_torch(&paths.embedding_bin())
}

/// The prompts of a run.
pub struct Prompts<'a> {
    pub train: &'a [String],
    /// Held-out prompts for validation (may be empty).
    pub val: &'a [String],
}

/// The training loop from `init` (`[1, L, D]`). `resume`: continue from
/// `out/checkpoint.safetensors`. `on_step` sees every step's metrics (progress display) and
/// may stop the run (as an interruption would).
pub fn train(
    cfg: &TrainConfig,
    sd: &mut StableDiffusion,
    objective: &Objective,
    prompts: Prompts,
    init: Tensor,
    resume: bool,
    mut on_step: impl FnMut(&StepMetrics, Option<&Validation>) -> std::ops::ControlFlow<()>,
) -> Result<TrainOutcome> {
    let Prompts {
        train: prompts,
        val: val_prompts,
    } = prompts;
    if prompts.is_empty() {
        return Err(Error::Invalid("the training prompt list is empty".into()));
    }
    let paths = RunPaths {
        out: cfg.out.clone(),
    };
    std::fs::create_dir_all(&paths.out)
        .map_err(|e| Error::file(&paths.out, format!("cannot create output folder: {e}")))?;
    let config_text = cfg.to_toml();
    let f = sd.vae_scale();
    let px = sd.unet.config().sample_size.unwrap_or(64) * f;
    let sampling = Sampling {
        steps: cfg.sampling_steps,
        guidance_scale: cfg.guidance_scale,
        height: cfg.height.unwrap_or(px),
        width: cfg.width.unwrap_or(px),
        backward: cfg.backward,
    };

    let adam_cfg = AdamWConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let (mut emb, mut opt, start, mut bad_in_row) = if resume && paths.checkpoint().is_file() {
        let ck = Checkpoint::load(&paths.checkpoint())?;
        if ck.config != config_text {
            return Err(Error::file(
                paths.checkpoint(),
                "was written by a run with another config; resume with the same settings or use a new --out",
            ));
        }
        truncate_jsonl(&paths.metrics(), ck.step)?;
        truncate_jsonl(&paths.validation(), ck.step + 1)?;
        (
            ck.embedding.to_dtype(DType::F32)?,
            ck.optimizer,
            ck.step,
            ck.bad_in_row,
        )
    } else {
        for p in [paths.metrics(), paths.validation()] {
            let _ = std::fs::remove_file(p);
        }
        let init = init
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        let opt = AdamW::new(adam_cfg, &init)?;
        (init, opt, 0, 0)
    };
    crate::io::write_atomic(&paths.config(), config_text.as_bytes())?;

    let model_dtype = sd.dtype();
    let device = sd.device().clone();
    let mut skipped = 0;
    let mut last_val = None;
    let mut null_val: Option<f64> = None;
    let val_seeds: Vec<u64> = (0..val_prompts.len() * cfg.val_seeds)
        .map(|i| mix(cfg.seed, u64::MAX, i as u64))
        .collect();
    let val_list: Vec<String> = val_prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), cfg.val_seeds))
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;

    for step in start..cfg.steps {
        let clock = std::time::Instant::now();
        let lr = cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps);
        let mut rng = SplitMix64::new(mix(cfg.seed, step, 0));
        let model_emb = emb.to_dtype(model_dtype)?.to_device(&device)?;
        let mut grad_sum: Option<Tensor> = None;
        let (mut loss_sum, mut rewards) = (0.0, vec![]);
        for _ in 0..cfg.micro_batches() {
            let batch: Vec<String> = (0..cfg.micro_batch_size)
                .map(|_| prompts[(rng.next_u64() % prompts.len() as u64) as usize].clone())
                .collect();
            let seeds: Vec<u64> = (0..cfg.micro_batch_size).map(|_| rng.next_u64()).collect();
            let k = cfg.sampling_steps - cfg.grad_step_window
                + (rng.next_u64() % cfg.grad_step_window as u64) as usize;
            let r = reneg_gradient(sd, objective, &model_emb, &batch, &seeds, k, &sampling)?;
            let g = r
                .grad
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?;
            grad_sum = Some(match grad_sum {
                Some(s) => (s + g)?,
                None => g,
            });
            loss_sum += r.loss;
            rewards.extend(r.rewards);
        }
        let m = cfg.micro_batches() as f64;
        let grad = (grad_sum.expect("at least one micro-batch") / m)?;
        let loss = loss_sum / m;
        let grad_norm = grad
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .sqrt();
        let finite = loss.is_finite() && grad_norm.is_finite();
        if finite {
            bad_in_row = 0;
            let grad = match cfg.max_grad_norm {
                Some(max) if grad_norm > max => (grad * (max / grad_norm))?,
                _ => grad,
            };
            emb = opt.update(&emb, &grad, lr)?;
        } else {
            bad_in_row += 1;
            skipped += 1;
        }
        let rm = mean(&rewards);
        let rstd = (rewards.iter().map(|r| (r - rm).powi(2)).sum::<f64>()
            / rewards.len().max(1) as f64)
            .sqrt();
        let metrics = StepMetrics {
            step,
            loss,
            reward_mean: rm,
            reward_std: rstd,
            lr,
            grad_norm,
            seconds: clock.elapsed().as_secs_f64(),
            skipped: !finite,
        };
        append_jsonl(&paths.metrics(), &metrics)?;
        let done = step + 1;
        if bad_in_row >= cfg.max_bad_steps {
            save_embedding(&emb, cfg, done, &paths)?;
            Checkpoint {
                embedding: emb.clone(),
                optimizer: opt.clone(),
                step: done,
                bad_in_row,
                config: config_text.clone(),
            }
            .save(&paths.checkpoint())?;
            return Err(Error::Invalid(format!(
                "stopped after {bad_in_row} steps in a row with a non-finite loss or gradient (step {done}); the last good embedding is in {}",
                paths.embedding().display()
            )));
        }
        let mut val = None;
        if cfg.val_every > 0
            && !val_list.is_empty()
            && (done % cfg.val_every == 0 || done == cfg.steps)
        {
            if null_val.is_none() {
                let null = sd.encode_prompt("")?;
                null_val = Some(mean(&sampled_reward(
                    sd, objective, &null, &val_list, &val_seeds, &sampling,
                )?));
            }
            let cur = emb.to_dtype(model_dtype)?.to_device(&device)?;
            let v = Validation {
                step: done,
                null_text: null_val.unwrap_or(f64::NAN),
                embedding: mean(&sampled_reward(
                    sd, objective, &cur, &val_list, &val_seeds, &sampling,
                )?),
            };
            append_jsonl(&paths.validation(), &v)?;
            val = Some(v);
        }
        if done % cfg.checkpoint_every == 0 || done == cfg.steps {
            Checkpoint {
                embedding: emb.clone(),
                optimizer: opt.clone(),
                step: done,
                bad_in_row,
                config: config_text.clone(),
            }
            .save(&paths.checkpoint())?;
            save_embedding(&emb, cfg, done, &paths)?;
            let _ = super::plot::reward_curve(&paths.metrics(), &paths.curve());
        }
        let flow = on_step(&metrics, val.as_ref());
        if val.is_some() {
            last_val = val;
        }
        if flow.is_break() {
            // Stopped by the caller (an interruption): the run resumes from the last checkpoint.
            return Ok(TrainOutcome {
                embedding: emb,
                steps_done: done,
                skipped,
                last_validation: last_val,
            });
        }
    }
    save_embedding(&emb, cfg, cfg.steps, &paths)?;
    Ok(TrainOutcome {
        embedding: emb,
        steps_done: cfg.steps,
        skipped,
        last_validation: last_val,
    })
}
