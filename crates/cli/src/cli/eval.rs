//! `reneg eval`: the flags as the [`Manifest`] that [`reneg::run::eval`] runs (every
//! (prompt, seed) with every negative from the same noise, each image scored by each reward)
//! and the report printed; `reneg eval merge` combines shard folders into the report an
//! unsharded run gives.

use super::rewards::RewardArg;
use super::{
    check_steps, device, image_size, lib, load_model, load_rewards, setup_precision, user,
    ModelArgs, Precision, SamplerArgs,
};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use reneg::eval::{self, Manifest, NegativeSpec, Shard};
use reneg::prompts::{self, Prompt};
use reneg::run::eval as run;
use reneg::train::step::Objective;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalCommand {
    #[command(subcommand)]
    pub sub: Option<EvalSub>,
    #[command(flatten)]
    pub run: EvalArgs,
}

#[derive(clap::Subcommand)]
pub enum EvalSub {
    /// Combine the output folders of sharded runs (--shard i/n) into one report.
    Merge(MergeArgs),
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The shard output folders.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Where the merged images, results and report go.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[command(flatten)]
    pub control: super::control::ControlArgs,
    /// Prompt file: PartiPrompts .tsv (Prompt and Category columns), HPSv2-style .json
    /// ({style: [prompts]}) or a list, or plain text (one per line).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A prompt; repeat for several (after those of --prompts).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seeds per prompt (base seed, base seed + 1, ...), the same for every negative.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// The base seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A negative to compare (repeat; the first is the baseline): null, handcrafted,
    /// prompt:TEXT, an embedding file, or per-sample:FILE (adaptation from that embedding).
    #[arg(long = "negative", required = true)]
    pub negatives: Vec<String>,
    /// A reward to score with (repeat, each with its --reward-model).
    #[arg(long, value_enum, required = true)]
    pub reward: Vec<RewardArg>,
    /// The model of each --reward, in the same order.
    #[arg(long)]
    pub reward_model: Vec<PathBuf>,
    /// DDIM sampling steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// Frames per clip, for a text-to-video model (default 16). Each reward scores every
    /// frame and the clip gets the mean; the clip's temporal consistency (mean cosine of
    /// consecutive frames' CLIP image embeddings, from the first CLIP-based reward) is
    /// reported beside the rewards.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Image height in pixels (default: the model's).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's).
    #[arg(long)]
    pub width: Option<usize>,
    // Per-sample negatives (all rewards that are not evaluation-only, equal weights).
    #[command(flatten)]
    pub adapt: super::AdaptArgs,
    /// Do only shard i of n (0 <= i < n) of the (prompt, seed) units, e.g. a job array's task
    /// id; combine the folders with `reneg eval merge`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Numeric precision: f32, tf32 (tensor-core matmuls on CUDA; f32 on the CPU), bf16 or fp16
    /// (autocast: low-precision weights and matmuls, f32 norms, softmax, latents and rewards;
    /// fp16 training scales the loss dynamically). --dtype is an alias.
    #[arg(long, alias = "dtype", value_enum, default_value = "f32")]
    pub precision: Precision,
    /// cpu, or cuda:N in CUDA builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output folder: images, results.jsonl, report, grids, chart (resumes).
    #[arg(long, default_value = "eval")]
    pub out: PathBuf,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd.sub {
        Some(EvalSub::Merge(m)) => merge(m),
        None => evaluate(cmd.run),
    }
}

fn load_prompts(args: &EvalArgs) -> Result<Vec<Prompt>> {
    let mut list = match &args.prompts {
        Some(file) => prompts::load(file).map_err(lib)?,
        None => vec![],
    };
    list.extend(args.prompt.iter().map(|p| Prompt {
        text: p.clone(),
        category: None,
        control_image: None,
    }));
    if let Some(n) = args.limit {
        list.truncate(n);
    }
    if list.is_empty() {
        return Err(user(
            "no prompts to evaluate: give --prompts FILE or --prompt TEXT (and a --limit above 0)",
        ));
    }
    Ok(list)
}

/// The files besides the model that shape this evaluation's images and scores, each stamped
/// with its content hash: reward models, negatives' embedding files, LoRAs, textual
/// inversions, a VAE, ControlNets and control images (the prompts' own included).
fn stamped_files(
    args: &EvalArgs,
    specs: &[NegativeSpec],
    prompts: &[Prompt],
) -> Result<Vec<eval::FileStamp>> {
    let mut files: Vec<(&str, PathBuf)> = args
        .reward_model
        .iter()
        .map(|p| ("reward model", p.clone()))
        .collect();
    for spec in specs {
        if let NegativeSpec::Embedding(p) | NegativeSpec::PerSample(p) = spec {
            files.push(("negative", p.clone()));
        }
    }
    files.extend(args.model.files()?);
    files.extend(args.control.files());
    files.extend(
        prompts
            .iter()
            .filter_map(|p| p.control_image.clone())
            .map(|p| ("control image", p)),
    );
    files.sort();
    files.dedup();
    files
        .iter()
        .map(|(role, p)| eval::FileStamp::of(role, p).map_err(lib))
        .collect()
}

/// The loaded rewards and what the manifest says of them.
struct Rewards {
    objective: Objective,
    names: Vec<String>,
    /// (name, evaluation-only) of each.
    flags: Vec<(String, bool)>,
    consistency_by: Option<usize>,
}

/// The rewards of `args`, each once; for clips, which one measures temporal consistency.
fn rewards(
    args: &EvalArgs,
    frames: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Rewards> {
    let rewards = load_rewards(&args.reward, &args.reward_model, dtype, device)?;
    let names: Vec<String> = rewards.iter().map(|(r, _)| r.name().to_string()).collect();
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        return Err(user(
            "the same reward is given twice; give each reward once",
        ));
    }
    let flags = rewards
        .iter()
        .map(|(r, _)| (r.name().to_string(), r.evaluation_only()))
        .collect();
    // A clip's temporal consistency is measured with the first reward that has a CLIP image
    // encoder (none: not measured, and the report says so by its absence).
    let consistency_by = frames.and_then(|_| {
        rewards
            .iter()
            .position(|(r, _)| r.image_encoder().is_some())
    });
    if frames.is_some() && consistency_by.is_none() {
        println!("note: no CLIP-based reward given (hps, pickscore, clip, aesthetic): the clips' temporal consistency is not measured");
    }
    Ok(Rewards {
        objective: Objective::new(rewards),
        names,
        flags,
        consistency_by,
    })
}

/// The model as the flags set it up, with the ControlNets' images: (model, the prompts' own
/// control images, the defaults they replace, (height, width), frames).
struct Model {
    sd: reneg::Pipeline,
    prompt_images: HashMap<PathBuf, Tensor>,
    default_images: Vec<Tensor>,
    size: (usize, usize),
    frames: Option<usize>,
}

fn model(args: &EvalArgs, prompts: &[Prompt], dtype: DType, device: &Device) -> Result<Model> {
    let mut sd = load_model(&args.model, dtype, device)?;
    args.sampler.apply(&mut sd)?;
    super::check_prompts(&sd, prompts)?;
    check_steps(&mut sd, args.steps)?;
    let first_image = prompts.iter().find_map(|p| p.control_image.clone());
    let control = &args.control;
    let size = super::control::apply(&mut sd, control, first_image.as_deref(), dtype, device)?;
    let prompt_images = super::control::prompt_images(&sd, control, prompts, size, device)?;
    let default_images = sd.controls().iter().map(|c| c.image.clone()).collect();
    let (height, width) = super::control::check_size(size, args.height, args.width)?;
    let size = image_size(&sd, height, width)?;
    let frames = sd.frames(args.frames).map_err(lib)?;
    Ok(Model {
        sd,
        prompt_images,
        default_images,
        size,
        frames,
    })
}

/// The run's manifest: everything that determines its images and scores.
fn manifest(
    args: &EvalArgs,
    m: &Model,
    r: &Rewards,
    specs: &[NegativeSpec],
    prompts: Vec<Prompt>,
) -> Result<Manifest> {
    let mut roles = eval::reward_roles(&args.negatives, specs, &run::trained_on(specs), &r.flags);
    let mut names = r.names.clone();
    if let Some(k) = r.consistency_by {
        names.push(eval::TEMPORAL_CONSISTENCY.to_string());
        roles.insert(
            eval::TEMPORAL_CONSISTENCY.to_string(),
            format!(
                "Independent: the mean cosine between consecutive frames' image embeddings from {}'s CLIP image encoder (1 = a still clip); no negative is optimised on it.",
                r.flags[k].0
            ),
        );
    }
    let per_sample = specs
        .iter()
        .any(|s| matches!(s, NegativeSpec::PerSample(_)));
    let a = &args.adapt;
    Ok(Manifest {
        model: args.model.name()?,
        files: stamped_files(args, specs, &prompts)?,
        prompts,
        seeds: args.seeds,
        base_seed: args.seed,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: m.size.0,
        width: m.size.1,
        negatives: args.negatives.clone(),
        rewards: names,
        adapt: per_sample.then_some((a.adapt_steps, a.adapt_patience, a.adapt_lr)),
        roles,
        frames: m.frames,
        model_options: [
            args.model.options(),
            args.sampler.options(),
            args.control.options(),
        ]
        .concat(),
        precision: args.precision.name().to_string(),
        device: device_kind(m.sd.device()).to_string(),
        sampler: m.sd.scheduler.label(),
    })
}

fn device_kind(device: &Device) -> &'static str {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu",
        candle_core::DeviceLocation::Cuda { .. } => "cuda",
        candle_core::DeviceLocation::Metal { .. } => "metal",
    }
}

pub(crate) fn evaluate(args: EvalArgs) -> Result<()> {
    let specs = args
        .negatives
        .iter()
        .map(|s| NegativeSpec::parse(s).map_err(user))
        .collect::<Result<Vec<_>>>()?;
    let shard = args
        .shard
        .as_deref()
        .map(|s| Shard::parse(s).map_err(user))
        .transpose()?;
    let prompts = load_prompts(&args)?;
    if args.seeds == 0 {
        return Err(user("--seeds must be at least 1"));
    }
    let device = device(&args.device)?;
    let dtype: DType = setup_precision(args.precision, &device)?;
    let mut m = model(&args, &prompts, dtype, &device)?;
    let r = rewards(&args, m.frames, dtype, &device)?;
    if specs
        .iter()
        .any(|s| matches!(s, NegativeSpec::PerSample(_)))
    {
        r.objective.check_optimisable().map_err(lib)?;
    }
    let negatives = run::negatives(&m.sd, &specs).map_err(lib)?;
    let manifest = manifest(&args, &m, &r, &specs, prompts)?;
    let eval_run = run::EvalRun {
        manifest: &manifest,
        out: args.out.clone(),
        shard,
        backward: args.adapt.adapt_backward,
        consistency_by: r.consistency_by,
    };
    let mut bar = super::progress::Progress::new(
        0,
        "{bar:30} {pos}/{len} images {msg} [{elapsed_precise}<{eta_precise}]",
        "evaluation image",
    );
    let (images, defaults) = (&m.prompt_images, &m.default_images);
    let mut before = |sd: &mut reneg::Pipeline, p: &Prompt| {
        super::control::use_prompt_image(sd, p, images, defaults)
    };
    run::evaluate(
        &mut m.sd,
        &eval_run,
        &negatives,
        &r.objective,
        &mut before,
        &mut bar,
    )
    .map_err(lib)?;
    report(&args.out, &manifest, shard)
}

/// Writes the report of `dir` and prints where it is; a shard's report covers its own units.
fn report(dir: &Path, manifest: &Manifest, shard: Option<Shard>) -> Result<()> {
    let r = run::report(dir, manifest).map_err(lib)?;
    let note = match shard {
        Some(s) => format!(
            " (shard {}/{}: merge the shards with `reneg eval merge`)",
            s.index, s.count
        ),
        None => String::new(),
    };
    println!(
        "{}: {}/{} unit(s) complete{note}",
        dir.join("report.md").display(),
        r.units_complete,
        r.units_planned
    );
    for row in &r.results {
        println!(
            "{:>12}  {:<40}  mean {:.4}  [{:.4}, {:.4}]  win {}",
            row.reward,
            row.negative,
            row.summary.mean,
            row.summary.ci95[0],
            row.summary.ci95[1],
            row.summary
                .win_rate_vs_first
                .map_or("-".into(), |w| format!("{:.1}%", 100.0 * w))
        );
    }
    Ok(())
}

pub fn merge(args: MergeArgs) -> Result<()> {
    let manifest = run::merge(&args.dirs, &args.out).map_err(lib)?;
    report(&args.out, &manifest, None)
}
