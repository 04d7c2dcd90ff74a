//! The global ReNeg training loop: AdamW with cosine decay on the negative embedding, batches
//! by gradient accumulation, non-finite steps skipped, checkpoints, validation, metrics.
//! Every random draw of step `s` is derived from (seed, s), so a resumed run ends with the
//! same embedding, bit for bit, as an uninterrupted one.

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::distributed::{sum_in_order, Collective, Contribution};
use super::memory;
use super::optim::{cosine_lr, for_learned, global_norm, update_learned, AdamW, AdamWConfig};
use super::step::{reneg_gradient, sampled_reward, Objective, Sampling};
use crate::conditioning::Conditioning;
use crate::embedding::NegativeEmbedding;
use crate::error::{Error, Result};
use crate::precision::LossScaler;
use crate::rng::SplitMix64;
use crate::Pipeline;
use candle_core::DType;
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
    /// The learned negative (f32, on the model's device).
    pub embedding: Conditioning,
    /// The step this run began at: 0, or the checkpoint's step when it resumed.
    pub started_at: u64,
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

/// Saves the negative, every part (safetensors with metadata, and a torch-loadable .bin).
pub fn save_embedding(
    emb: &Conditioning,
    cfg: &TrainConfig,
    steps: u64,
    paths: &RunPaths,
) -> Result<()> {
    let mut e = NegativeEmbedding::from_conditioning(emb)?;
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

/// The training loop from `init` (a negative of batch 1; every floating part is learned,
/// a mask stays fixed). `resume`: continue from
/// `out/checkpoint.safetensors`. `on_step` sees every step's metrics (progress display) and
/// may stop the run (as an interruption would).
pub fn train(
    cfg: &TrainConfig,
    sd: &mut Pipeline,
    objective: &Objective,
    prompts: Prompts,
    init: Conditioning,
    resume: bool,
    on_step: impl FnMut(&StepMetrics, Option<&Validation>) -> std::ops::ControlFlow<()>,
) -> Result<TrainOutcome> {
    let mut single = super::distributed::Single;
    train_in_group(
        cfg,
        sd,
        objective,
        prompts,
        init,
        resume,
        &mut single,
        on_step,
    )
}

/// Whether the gradient step checkpoints activations for `cfg` on `sd`'s device
/// (`cfg.checkpointing`, with `auto` decided from the estimated graph and the free memory).
pub fn checkpointing_for(cfg: &TrainConfig, sd: &Pipeline) -> bool {
    let (h, w) = image_size(cfg, sd);
    // A video's frames go through the networks as a batch.
    let batch = cfg.micro_batch_size * cfg.frames.unwrap_or(1);
    let (plain, _) = memory::graph_bytes(sd, batch, h, w, cfg.backward);
    memory::decide(cfg.checkpointing, plain, memory::free_bytes(sd.device()))
}

fn image_size(cfg: &TrainConfig, sd: &Pipeline) -> (usize, usize) {
    let px = sd.default_size();
    (cfg.height.unwrap_or(px), cfg.width.unwrap_or(px))
}

/// [`train`] as one rank of a data-parallel group ([`super::distributed`]): this rank computes
/// its share of each step's micro-batches, `collective` exchanges the gradients, and every
/// rank applies the same update. Only rank 0 writes files.
#[allow(clippy::too_many_arguments)]
pub fn train_in_group(
    cfg: &TrainConfig,
    sd: &mut Pipeline,
    objective: &Objective,
    prompts: Prompts,
    init: Conditioning,
    resume: bool,
    collective: &mut dyn Collective,
    mut on_step: impl FnMut(&StepMetrics, Option<&Validation>) -> std::ops::ControlFlow<()>,
) -> Result<TrainOutcome> {
    let world = collective.world();
    let main = world.is_main();
    let Prompts {
        train: prompts,
        val: val_prompts,
    } = prompts;
    if prompts.is_empty() {
        return Err(Error::Invalid("the training prompt list is empty".into()));
    }
    // Validation's baseline, what the pipeline uses without a negative (PixArt: T5's ""),
    // encoded now with every prompt: a costly encoder (T5-XXL) is let go before training samples.
    let null_negative = if val_prompts.is_empty() {
        None
    } else {
        Some(sd.no_negative()?)
    };
    let texts: Vec<&str> = prompts
        .iter()
        .chain(val_prompts)
        .map(String::as_str)
        .collect();
    sd.encode_ahead(&texts)?;
    let paths = RunPaths {
        out: cfg.out.clone(),
    };
    std::fs::create_dir_all(&paths.out)
        .map_err(|e| Error::file(&paths.out, format!("cannot create output folder: {e}")))?;
    let config_text = cfg.to_toml();
    let (height, width) = image_size(cfg, sd);
    let on = checkpointing_for(cfg, sd);
    sd.set_checkpointing(on);
    let mut sampling = Sampling {
        steps: cfg.sampling_steps,
        guidance_scale: cfg.guidance_scale,
        height,
        width,
        frames: cfg.frames,
        backward: cfg.backward,
        loss_scale: 1.0,
    };
    let device = sd.device().clone();

    let adam_cfg = AdamWConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    // The embedding and AdamW's state are f32 masters on the model's device.
    let (mut emb, mut opt, start, mut bad_in_row, mut scaler) = if resume
        && paths.checkpoint().is_file()
    {
        let ck = Checkpoint::load(&paths.checkpoint())?;
        if ck.config != config_text {
            return Err(Error::file(
                paths.checkpoint(),
                "was written by a run with another config; resume with the same settings or use a new --out",
            ));
        }
        if main {
            truncate_jsonl(&paths.metrics(), ck.step)?;
            truncate_jsonl(&paths.validation(), ck.step + 1)?;
        }
        (
            ck.embedding
                .map(|_, t| Ok(t.to_dtype(DType::F32)?.to_device(&device)?))?,
            ck.optimizer
                .iter()
                .map(|o| o.to_device(&device))
                .collect::<Result<Vec<_>>>()?,
            ck.step,
            ck.bad_in_row,
            ck.loss_scaler,
        )
    } else {
        if main {
            for p in [paths.metrics(), paths.validation()] {
                let _ = std::fs::remove_file(p);
            }
        }
        let init = init.map(|_, t| Ok(t.to_dtype(DType::F32)?.to_device(&device)?))?;
        let opt = for_learned(&adam_cfg, &init)?;
        let scaler = LossScaler::for_precision(cfg.precision);
        (init, opt, 0, 0, scaler)
    };
    if main {
        crate::io::write_atomic(&paths.config(), config_text.as_bytes())?;
    }

    let model_dtype = sd.dtype();
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
        let model_emb = emb.map(|_, t| Ok(t.to_dtype(model_dtype)?))?;
        sampling.loss_scale = scaler.scale;
        let mut mine = vec![];
        for index in 0..cfg.micro_batches() {
            // Every rank makes every draw, so all ranks agree on every micro-batch.
            let batch: Vec<String> = (0..cfg.micro_batch_size)
                .map(|_| prompts[(rng.next_u64() % prompts.len() as u64) as usize].clone())
                .collect();
            let seeds: Vec<u64> = (0..cfg.micro_batch_size).map(|_| rng.next_u64()).collect();
            let k = cfg.sampling_steps - cfg.grad_step_window
                + (rng.next_u64() % cfg.grad_step_window as u64) as usize;
            if !world.owns(index) {
                continue;
            }
            let r = reneg_gradient(sd, objective, &model_emb, &batch, &seeds, k, &sampling)?;
            mine.push(Contribution {
                index,
                grad: r
                    .grad
                    .iter()
                    .map(|g| Ok(g.to_dtype(DType::F32)?))
                    .collect::<Result<_>>()?,
                loss: r.loss,
                rewards: r.rewards,
            });
        }
        let (grad_sum, loss_sum, rewards) = sum_in_order(&collective.gather(step, mine)?)?;
        let m = cfg.micro_batches() as f64;
        let grad = grad_sum
            .iter()
            .map(|g| Ok((g / m)?))
            .collect::<Result<Vec<_>>>()?;
        let loss = loss_sum / m;
        let grad_norm = global_norm(&grad)?;
        let finite = loss.is_finite() && grad_norm.is_finite();
        // Under fp16 loss scaling a non-finite gradient is an overflow of the scaled backward:
        // the step is skipped and the scale halved, without counting as a bad step.
        let overflow = !finite && scaler.absorbs_overflow();
        if scaler.update(finite) {
            bad_in_row = 0;
            let grad = match cfg.max_grad_norm {
                // Every part scaled by the one factor, as clip_grad_norm_ does.
                Some(max) if grad_norm > max => grad
                    .iter()
                    .map(|g| Ok((g * (max / grad_norm))?))
                    .collect::<Result<Vec<_>>>()?,
                _ => grad,
            };
            emb = update_learned(&mut opt, &emb, &grad, lr)?;
        } else {
            skipped += 1;
            if !overflow {
                bad_in_row += 1;
            }
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
        if main {
            append_jsonl(&paths.metrics(), &metrics)?;
        }
        let done = step + 1;
        let checkpoint = |opt: &[AdamW], scaler: &LossScaler| -> Result<()> {
            if !main {
                return Ok(());
            }
            Checkpoint {
                embedding: emb.clone(),
                optimizer: opt.to_vec(),
                step: done,
                bad_in_row,
                loss_scaler: scaler.clone(),
                config: config_text.clone(),
            }
            .save(&paths.checkpoint())?;
            save_embedding(&emb, cfg, done, &paths)
        };
        if bad_in_row >= cfg.max_bad_steps {
            checkpoint(&opt, &scaler)?;
            return Err(Error::Invalid(format!(
                "stopped after {bad_in_row} steps in a row with a non-finite loss or gradient (step {done}); the last good embedding is in {}",
                paths.embedding().display()
            )));
        }
        let mut val = None;
        if main
            && cfg.val_every > 0
            && !val_list.is_empty()
            && (done % cfg.val_every == 0 || done == cfg.steps)
        {
            if null_val.is_none() {
                let null = match &null_negative {
                    Some(n) => n.clone(),
                    None => sd.no_negative()?,
                };
                null_val = Some(mean(&validation_rewards(
                    sd, objective, &null, &val_list, &val_seeds, &sampling, cfg,
                )?));
            }
            let cur = emb.map(|_, t| Ok(t.to_dtype(model_dtype)?))?;
            let v = Validation {
                step: done,
                null_text: null_val.unwrap_or(f64::NAN),
                embedding: mean(&validation_rewards(
                    sd, objective, &cur, &val_list, &val_seeds, &sampling, cfg,
                )?),
            };
            append_jsonl(&paths.validation(), &v)?;
            val = Some(v);
        }
        if done % cfg.checkpoint_every == 0 || done == cfg.steps {
            checkpoint(&opt, &scaler)?;
            if main {
                let _ = super::plot::reward_curve(&paths.metrics(), &paths.curve());
            }
        }
        let flow = on_step(&metrics, val.as_ref());
        if val.is_some() {
            last_val = val;
        }
        if flow.is_break() {
            // Stopped by the caller (an interruption): the run resumes from the last checkpoint.
            return Ok(TrainOutcome {
                embedding: emb,
                started_at: start,
                steps_done: done,
                skipped,
                last_validation: last_val,
            });
        }
    }
    if main {
        save_embedding(&emb, cfg, cfg.steps, &paths)?;
    }
    Ok(TrainOutcome {
        embedding: emb,
        started_at: start,
        steps_done: cfg.steps,
        skipped,
        last_validation: last_val,
    })
}

/// Validation rewards of `list` x `seeds`, in micro-batches of the training's size (the whole
/// list at once would hold every image's latents and activations together).
fn validation_rewards(
    sd: &mut Pipeline,
    objective: &Objective,
    emb: &Conditioning,
    list: &[String],
    seeds: &[u64],
    sampling: &Sampling,
    cfg: &TrainConfig,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(list.len());
    let size = cfg.micro_batch_size.max(1);
    for (prompts, seeds) in list.chunks(size).zip(seeds.chunks(size)) {
        out.extend(sampled_reward(
            sd, objective, emb, prompts, seeds, sampling,
        )?);
    }
    Ok(out)
}
