//! A training run from its config (`TrainConfig`, the plan that `config.toml` writes out):
//! the prompts, the model with its LoRAs, sampler and ControlNet, the rewards and the starting
//! negative, then the loop of [`crate::train::global`], its steps and validations reported
//! through [`Progress`].

use super::Progress;
use crate::error::{Error, Result};
use crate::train::config::{Init, TrainConfig};
use crate::train::distributed::{Collective, FileGroup, Single, World};
use crate::train::global::{self, Prompts, TrainOutcome};
use crate::train::step::Objective;
use crate::Pipeline;
use candle_core::Device;
use std::path::PathBuf;

/// What a run needs besides its config: where it runs and how the model is found.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Continue from the checkpoint in the config's `out`.
    pub resume: bool,
    pub device: Device,
    /// This process's place in a data-parallel group.
    pub world: World,
    /// The folder ranks exchange gradients through (default `out/.dist`).
    pub exchange_dir: Option<PathBuf>,
    /// How a single-file or hub model is found (the config names the model itself).
    pub offline: bool,
    pub single_file: crate::single_file::Overrides,
}

impl Setup {
    /// One process on `device`, the model found as named.
    pub fn single(device: Device) -> Self {
        Self {
            resume: false,
            device,
            world: World::single(),
            exchange_dir: None,
            offline: false,
            single_file: Default::default(),
        }
    }
}

/// The control image sets the training images' size, recorded in the saved config; a
/// height or width that disagrees is refused.
fn control_image(cfg: &mut TrainConfig) -> Result<Option<(Vec<u8>, usize, usize)>> {
    let Some(p) = &cfg.control_image else {
        return Ok(None);
    };
    let (rgb, w, h) = crate::control::read_image(p, None, &[])?;
    if cfg.height.is_some_and(|x| x != h) || cfg.width.is_some_and(|x| x != w) {
        return Err(Error::file(
            p,
            format!(
                "(--control-image) is {w}x{h}, but height/width ask for {}x{}",
                cfg.width.unwrap_or(w),
                cfg.height.unwrap_or(h)
            ),
        ));
    }
    cfg.height = Some(h);
    cfg.width = Some(w);
    Ok(Some((rgb, w, h)))
}

fn prompt_texts(path: &std::path::Path) -> Result<Vec<String>> {
    Ok(crate::prompts::load(path)?
        .into_iter()
        .map(|p| p.text)
        .collect())
}

/// The model as the config sets it up: LoRAs, frames, sampler, guidance rescale, ControlNet.
fn model(cfg: &mut TrainConfig, setup: &Setup, progress: &mut dyn Progress) -> Result<Pipeline> {
    let control = control_image(cfg)?;
    let dtype = cfg.precision.weight_dtype();
    let plan = super::model::ModelPlan {
        offline: setup.offline,
        model_config: setup.single_file.config_dir.clone(),
        prediction_type: setup.single_file.prediction_type.clone(),
        loras: cfg.loras.clone(),
        max_sequence_length: cfg.max_sequence_length,
        ..super::model::ModelPlan::of(&cfg.model)
    };
    let mut sd = plan.load(dtype, &setup.device)?;
    // A video model trains on clips of `frames` (recorded in the saved config).
    cfg.frames = sd.frames(cfg.frames)?;
    if let Some(note) = sd.set_sampler(Some(cfg.scheduler), cfg.eta)? {
        progress.warn(&note);
    }
    sd.guidance_rescale = cfg.guidance_rescale;
    if let (Some(cn), Some((rgb, w, h))) = (&cfg.controlnet, &control) {
        let model = crate::control::load(cn, None, dtype, &setup.device)?;
        let image =
            crate::control::image_tensor(rgb, *w, *h, &setup.device)?.to_dtype(sd.dtype())?;
        sd.add_controlnet(model, image, cfg.controlnet_scale, cn)?;
        sd.set_guess_mode(cfg.guess_mode)?;
    }
    Ok(sd)
}

/// Trains as `cfg` says. Returns the outcome and the config as resolved (frames, image
/// size), which is what the run wrote to `out/config.toml`.
pub fn train(
    mut cfg: TrainConfig,
    setup: &Setup,
    progress: &mut dyn Progress,
) -> Result<(TrainOutcome, TrainConfig)> {
    cfg.precision.check(&setup.device)?;
    cfg.precision.apply(&setup.device);
    let prompts = prompt_texts(&cfg.prompts)?;
    let val = match &cfg.val_prompts {
        Some(p) => prompt_texts(p)?,
        None => vec![],
    };
    let mut sd = model(&mut cfg, setup, progress)?;
    let rewards = cfg
        .rewards
        .iter()
        .map(|r| {
            let dtype = cfg.precision.weight_dtype();
            Ok((
                crate::reward::load::load(r.kind, &r.model, dtype, &setup.device)?,
                r.weight,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let objective = Objective::new(rewards);
    objective.check_optimisable()?;
    let init = match &cfg.init {
        Init::Null => {
            progress.note(&format!(
                "the negative starts from what the pipeline uses without one: {}",
                sd.encoder.no_negative_label()
            ));
            sd.no_negative()?
        }
        Init::Prompt(t) => sd.encode(t)?,
        Init::File(p) => sd.negative(&crate::embedding::NegativeEmbedding::load(p)?, p)?,
    };
    let world = setup.world;
    let mut collective: Box<dyn Collective> = if world.world_size > 1 {
        let dir = setup
            .exchange_dir
            .clone()
            .unwrap_or_else(|| cfg.out.join(".dist"));
        Box::new(FileGroup::new(
            &dir,
            world,
            cfg.micro_batches(),
            &setup.device,
        )?)
    } else {
        Box::new(Single)
    };
    if world.is_main() {
        progress.note(&format!(
            "training on {} ({}, {}, activation checkpointing {}{})",
            cfg.model,
            format!("{:?}", setup.device.location()).to_lowercase(),
            cfg.precision.name(),
            if global::checkpointing_for(&cfg, &sd) {
                "on"
            } else {
                "off"
            },
            if world.world_size > 1 {
                format!(", rank 0 of {}", world.world_size)
            } else {
                String::new()
            }
        ));
    }
    progress.begin(cfg.steps, "training step");
    let outcome = global::train_in_group(
        &cfg,
        &mut sd,
        &objective,
        Prompts {
            train: &prompts,
            val: &val,
        },
        init,
        setup.resume,
        collective.as_mut(),
        |m, v| {
            // The status first: a log line goes out with the position.
            progress.status(&format!("loss {:.4}, reward {:.4}", m.loss, m.reward_mean));
            progress.position(m.step + 1);
            if let Some(v) = v {
                progress.note(&format!(
                    "step {}: validation reward {:.4} (null text {:.4})",
                    v.step, v.embedding, v.null_text
                ));
            }
            std::ops::ControlFlow::Continue(())
        },
    )?;
    progress.finish();
    Ok((outcome, cfg))
}
