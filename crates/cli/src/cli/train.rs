//! `reneg train`: learn a global negative embedding by reward feedback. Options come from
//! `--config FILE.toml`, then flags; the resolved config (the plan [`reneg::run::train`]
//! runs) is written to `--out`.

use super::rewards::RewardArg;
use super::{device, lib, user, Precision};
use anyhow::Result;
use reneg::train::config::{Init, TrainConfig};
use std::path::PathBuf;
use toml::Value;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// A TOML file with any of the options below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: diffusers folder, single-file checkpoint or hub-cache repo id (default: the
    /// built-in miniature world, with its reward and prompts unless given).
    #[arg(long)]
    pub model: Option<String>,
    /// A LoRA (kohya or diffusers/PEFT safetensors) merged into the model at load, FILE or
    /// FILE:SCALE; repeat for several.
    #[arg(long)]
    pub lora: Vec<String>,
    /// Reward kind; repeat with --reward-model (and --reward-weight) for several.
    #[arg(long, value_enum)]
    pub reward: Vec<RewardArg>,
    /// The model of each --reward, in the same order (default: the miniature world's reward).
    #[arg(long)]
    pub reward_model: Vec<PathBuf>,
    /// The weight of each --reward in the objective (default: 1 each).
    #[arg(long)]
    pub reward_weight: Vec<f64>,
    /// Training prompts (.txt, .tsv with a Prompt column, .json).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Held-out prompts, scored with fixed noise every --val-every steps (reported, never used to select).
    #[arg(long)]
    pub val_prompts: Option<PathBuf>,
    /// null, prompt:TEXT, or an embedding file.
    #[arg(long)]
    pub init: Option<String>,
    /// Output folder: embedding, checkpoint, metrics, reward curve.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimisation steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate (AdamW, cosine decay after the warm-up).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Prompts per optimisation step (accumulated over micro-batches).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Prompts per forward/backward pass.
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Classifier-free guidance scale of the sampling.
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Sampling steps of each sampled trajectory.
    #[arg(long)]
    pub sampling_steps: Option<usize>,
    /// The sampler of the trajectories: ddim (the paper's), euler, euler-a, dpm++2m,
    /// dpm++2m-karras, unipc or pndm; the reward gradient goes through its x0 prediction.
    #[arg(long, value_parser = super::parse_scheduler)]
    pub scheduler: Option<reneg::scheduler::SchedulerKind>,
    /// DDIM's eta: 0 deterministic, up to 1 (DDPM's variance); DDIM only.
    #[arg(long)]
    pub eta: Option<f64>,
    /// diffusers' guidance_rescale, 0 to 1 (Lin et al.; 0.7 for zero-terminal-SNR models).
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// Train through a ControlNet (diffusers folder or original single file): sampling and the
    /// reward gradient go through it, with --control-image for every prompt.
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    /// The ControlNet's conditioning image (PNG, JPEG, WebP); the images take its size.
    #[arg(long)]
    pub control_image: Option<PathBuf>,
    /// diffusers' controlnet_conditioning_scale [default: 1].
    #[arg(long)]
    pub controlnet_scale: Option<f64>,
    /// diffusers' guess mode for the ControlNet.
    #[arg(long)]
    pub guess_mode: bool,
    /// The gradient step is drawn from the last this-many sampling steps.
    #[arg(long)]
    pub grad_step_window: Option<usize>,
    /// Frames per clip, for a text-to-video model (default 16; the gradient goes through every
    /// frame, so memory grows with it).
    #[arg(long)]
    pub frames: Option<usize>,
    /// PixArt: the prompt length in tokens (diffusers' max_sequence_length; default 120).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// Image height in pixels (default: the model's).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's).
    #[arg(long)]
    pub width: Option<usize>,
    /// Seed of prompt order, noise and gradient steps.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Clip the gradient to this norm (default: no clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Stop after this many non-finite steps in a row.
    #[arg(long)]
    pub max_bad_steps: Option<u64>,
    /// Write a resumable checkpoint every this-many steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Validate every this-many steps.
    #[arg(long)]
    pub val_every: Option<u64>,
    /// Seeds per validation prompt.
    #[arg(long)]
    pub val_seeds: Option<usize>,
    /// staged: lower peak memory (the UNet's negative branch is recomputed); one-pass: faster,
    /// the UNet's graph kept through the decoder's backward. Same gradient.
    #[arg(long, value_enum)]
    pub backward: Option<reneg::train::step::Backward>,
    /// Never touch the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// For single-file checkpoints: a diffusers-style folder of configs (see `generate --help`).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// For single-file checkpoints: epsilon or v_prediction.
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Continue from --out's checkpoint (the same config is required).
    #[arg(long)]
    pub resume: bool,
    /// Numeric precision: f32 (default), tf32 (tensor-core matmuls on CUDA; f32 on the CPU),
    /// bf16 or fp16 (autocast: low-precision weights and matmuls, f32 norms, softmax, latents
    /// and rewards; fp16 scales the loss dynamically). --dtype is an alias.
    #[arg(long, alias = "dtype", value_enum)]
    pub precision: Option<Precision>,
    /// Activation checkpointing of the gradient step: off, on, or auto (default: on when the
    /// estimated graph of a micro-batch would not fit in the free device memory).
    #[arg(long, value_enum)]
    pub checkpointing: Option<reneg::train::memory::Checkpointing>,
    /// cpu or cuda[:N]. Under torchrun (WORLD_SIZE > 1), cuda means cuda:LOCAL_RANK.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The flags given, as a TOML table over the config file's.
fn overrides(a: &TrainArgs) -> Result<toml::Table> {
    let mut t = toml::Table::new();
    plain_overrides(a, &mut t);
    choice_overrides(a, &mut t)?;
    if let Some(rewards) = reward_overrides(a)? {
        t.insert("rewards".into(), rewards);
    }
    Ok(t)
}

/// The flags of one number, path or word.
fn plain_overrides(a: &TrainArgs, t: &mut toml::Table) {
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            t.insert(k.to_string(), v);
        }
    };
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| Value::String(p.display().to_string()));
    put("model", a.model.clone().map(Value::String));
    if !a.lora.is_empty() {
        put(
            "loras",
            Some(Value::Array(
                a.lora.iter().cloned().map(Value::String).collect(),
            )),
        );
    }
    put("prompts", path(&a.prompts));
    put("val_prompts", path(&a.val_prompts));
    put("out", path(&a.out));
    let int = |v: Option<u64>| v.map(|v| Value::Integer(v as i64));
    let uint = |v: Option<usize>| v.map(|v| Value::Integer(v as i64));
    let float = |v: Option<f64>| v.map(Value::Float);
    put("steps", int(a.steps));
    put("lr", float(a.lr));
    put("warmup_steps", int(a.warmup_steps));
    put("weight_decay", float(a.weight_decay));
    put("batch_size", uint(a.batch_size));
    put("micro_batch_size", uint(a.micro_batch_size));
    put("guidance_scale", float(a.guidance_scale));
    put("sampling_steps", uint(a.sampling_steps));
    put("grad_step_window", uint(a.grad_step_window));
    put(
        "scheduler",
        a.scheduler.map(|k| Value::String(k.name().to_string())),
    );
    put("eta", float(a.eta));
    put("guidance_rescale", float(a.guidance_rescale));
    put("controlnet", path(&a.controlnet));
    put("control_image", path(&a.control_image));
    put("controlnet_scale", float(a.controlnet_scale));
    put("guess_mode", a.guess_mode.then_some(Value::Boolean(true)));
    put("height", uint(a.height));
    put("width", uint(a.width));
    put("frames", uint(a.frames));
    put("max_sequence_length", uint(a.max_sequence_length));
    put("seed", int(a.seed));
    put("max_grad_norm", float(a.max_grad_norm));
    put("max_bad_steps", int(a.max_bad_steps));
    put("checkpoint_every", int(a.checkpoint_every));
    put("val_every", int(a.val_every));
    put("val_seeds", uint(a.val_seeds));
}

/// The flags that choose among named values.
fn choice_overrides(a: &TrainArgs, t: &mut toml::Table) -> Result<()> {
    if let Some(b) = a.backward {
        let v = toml::Value::try_from(b).map_err(|e| user(format!("--backward: {e}")))?;
        t.insert("backward".into(), v);
    }
    if let Some(p) = a.precision {
        t.insert("precision".into(), Value::String(p.name().into()));
    }
    if let Some(c) = a.checkpointing {
        let v = toml::Value::try_from(c).map_err(|e| user(format!("--checkpointing: {e}")))?;
        t.insert("checkpointing".into(), v);
    }
    if let Some(init) = &a.init {
        let v =
            toml::Value::try_from(Init::parse(init)).map_err(|e| user(format!("--init: {e}")))?;
        t.insert("init".into(), v);
    }
    Ok(())
}

/// `--reward KIND --reward-model PATH [--reward-weight W]` as the config's `rewards` list.
fn reward_overrides(a: &TrainArgs) -> Result<Option<Value>> {
    if a.reward.is_empty() && a.reward_model.is_empty() {
        return Ok(None);
    }
    if a.reward.len() != a.reward_model.len() {
        return Err(user(format!(
            "{} --reward but {} --reward-model: give one model per reward",
            a.reward.len(),
            a.reward_model.len()
        )));
    }
    if !a.reward_weight.is_empty() && a.reward_weight.len() != a.reward.len() {
        return Err(user("--reward-weight: give one weight per reward, or none"));
    }
    let list: Vec<Value> = a
        .reward
        .iter()
        .zip(&a.reward_model)
        .enumerate()
        .map(|(i, (k, m))| {
            let kind = k.core().ok_or_else(|| {
                user(format!(
                    "--reward {}: evaluation-only (the miniature world's judge scores in `reneg eval`); training cannot optimise it",
                    k.flag()
                ))
            })?;
            let mut e = toml::Table::new();
            e.insert(
                "kind".into(),
                toml::Value::try_from(kind).expect("kind serialises"),
            );
            e.insert("model".into(), Value::String(m.display().to_string()));
            e.insert(
                "weight".into(),
                Value::Float(a.reward_weight.get(i).copied().unwrap_or(1.0)),
            );
            Ok(Value::Table(e))
        })
        .collect::<Result<_>>()?;
    Ok(Some(Value::Array(list)))
}

/// `train --help` with each option's default from [`TrainConfig::default_values`], the one
/// place that decides them (the flags stay unset, so that a TOML file can give them).
pub fn document_defaults(cmd: clap::Command) -> clap::Command {
    let mut cmd = cmd;
    for (key, value) in TrainConfig::default_values() {
        if !cmd.get_arguments().any(|a| a.get_id().as_str() == key) {
            continue;
        }
        let shown = match &value {
            toml::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        cmd = cmd.mut_arg(key.as_str(), |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} [default: {shown}]"))
        });
    }
    cmd
}

/// Without a model, the built-in miniature world: its pipeline, and (unless given) its
/// preference reward and prompt files.
fn mini_defaults(file: &toml::Table, over: &mut toml::Table) {
    let given = |over: &toml::Table, k: &str| file.contains_key(k) || over.contains_key(k);
    if given(over, "model") {
        return;
    }
    let Ok(root) = super::builtin::mini_root() else {
        // Unwritable data dir: the model stays unset, and the config check names it.
        return;
    };
    let s = |p: std::path::PathBuf| Value::String(p.display().to_string());
    over.insert("model".into(), s(root.join("pipeline")));
    if !given(over, "rewards") {
        let mut e = toml::Table::new();
        e.insert("kind".into(), Value::String("hps".into()));
        e.insert("model".into(), s(root.join("reward")));
        over.insert("rewards".into(), Value::Array(vec![Value::Table(e)]));
    }
    if !given(over, "prompts") {
        over.insert("prompts".into(), s(root.join("prompts/train.txt")));
    }
    if !given(over, "val_prompts") {
        over.insert("val_prompts".into(), s(root.join("prompts/heldout.txt")));
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (table, source) = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| user(format!("{}: cannot read: {e}", p.display())))?;
            (TrainConfig::from_toml(&text, p).map_err(lib)?, p.clone())
        }
        None => (toml::Table::new(), PathBuf::from("<command line>")),
    };
    let mut over = overrides(&a)?;
    mini_defaults(&table, &mut over);
    let cfg = TrainConfig::resolve(table, over, &source).map_err(lib)?;
    let world = reneg::train::distributed::World::from_env().map_err(lib)?;
    let setup = reneg::run::train::Setup {
        resume: a.resume,
        device: match a.device.as_str() {
            "cuda" if world.world_size > 1 => device(&format!("cuda:{}", world.local_rank))?,
            d => device(d)?,
        },
        world,
        exchange_dir: std::env::var_os("RENEG_DIST_DIR").map(PathBuf::from),
        offline: a.offline,
        single_file: reneg::single_file::Overrides {
            config_dir: a.model_config.clone(),
            prediction_type: a.prediction_type.clone(),
        },
    };
    let mut bar = super::progress::Progress::new(
        cfg.steps,
        "{bar:30} step {pos}/{len} {msg} {per_sec} [{elapsed_precise}<{eta_precise}]",
        "training step",
    );
    let (outcome, cfg) = reneg::run::train::train(cfg, &setup, &mut bar).map_err(lib)?;
    // Where the run began says whether --resume continued the checkpoint (and the interrupt
    // tests read it).
    let began = match outcome.started_at {
        0 => String::new(),
        k => format!(", resumed at step {k}"),
    };
    println!(
        "trained {} steps ({} skipped{began}); embedding: {}",
        outcome.steps_done,
        outcome.skipped,
        cfg.out.join("embedding.safetensors").display()
    );
    Ok(())
}
