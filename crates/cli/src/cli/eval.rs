//! `reneg eval`: the flags as the [`Manifest`] that [`reneg::run::eval`] runs (every
//! (prompt, seed) with every negative from the same noise, each image scored by each reward)
//! and the report printed; `reneg eval merge` combines shard folders into the report an
//! unsharded run gives.

use super::rewards::RewardArg;
use super::{device, lib, user, ModelArgs, Precision, SamplerArgs};
use anyhow::Result;
use reneg::eval::{Manifest, NegativeSpec, Shard};
use reneg::prompts::{self, Prompt};
use reneg::run::eval::{self as run, EvalPlan, RewardChoice};
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
    /// Put the images inside report.html (one file to send; larger) instead of referencing
    /// them beside it.
    #[arg(long)]
    pub embed_images: bool,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[command(flatten)]
    pub sizes: super::SizeArgs,
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
    #[arg(long = "negative", required_unless_present = "plan")]
    pub negatives: Vec<String>,
    /// A reward to score with (repeat, each with its --reward-model).
    #[arg(long, value_enum, required_unless_present = "plan")]
    pub reward: Vec<RewardArg>,
    /// The model of each --reward, in the same order.
    #[arg(long)]
    pub reward_model: Vec<PathBuf>,
    /// Sampling steps (default: 30; 50 for VideoCrafter2).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default: 7.5; 12 for VideoCrafter2).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Frames per clip, for a text-to-video model (default 16). Each reward scores every
    /// frame and the clip gets the mean; the clip's temporal consistency (mean cosine of
    /// consecutive frames' CLIP image embeddings, from the first CLIP-based reward) is
    /// reported beside the rewards.
    #[arg(long)]
    pub frames: Option<usize>,
    /// The frame rate VideoCrafter2 clips are conditioned on and saved at (default 28).
    #[arg(long)]
    pub fps: Option<u32>,
    /// Put the images inside report.html (one file to send; larger) instead of referencing
    /// them beside it.
    #[arg(long)]
    pub embed_images: bool,
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
    /// Output folder: images, results.jsonl, report, grids, chart (resumes) [default: eval].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run the evaluation a plan file describes (JSON, as `reneg mini experiment` writes them:
    /// reneg::run::eval::EvalPlan) instead of one from the other flags; --shard, --out and
    /// --device still apply.
    #[arg(long)]
    pub plan: Option<PathBuf>,
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
        ..Default::default()
    }));
    if let Some(n) = args.limit {
        list.truncate(n);
    }
    Ok(list)
}

/// The evaluation the flags describe.
fn plan_of_flags(args: &EvalArgs) -> Result<EvalPlan> {
    if args.reward.len() != args.reward_model.len() {
        return Err(user("give one --reward-model per --reward"));
    }
    for spec in &args.negatives {
        NegativeSpec::parse(spec).map_err(user)?;
    }
    let rewards = args
        .reward
        .iter()
        .zip(&args.reward_model)
        .map(|(k, m)| RewardChoice {
            kind: k.flag(),
            model: m.clone(),
        })
        .collect();
    Ok(EvalPlan {
        model: args.model.plan()?,
        sampler: args.sampler.plan(),
        control: args.control.plan(),
        prompts: load_prompts(args)?,
        seeds: args.seeds,
        seed: args.seed,
        negatives: args.negatives.clone(),
        rewards,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        frames: args.frames,
        fps: args.fps,
        sizes: args.sizes.conditioning(),
        height: args.height,
        width: args.width,
        adapt: args.adapt.settings(),
        shard: None,
        precision: args.precision,
        out: PathBuf::from("eval"),
    })
}

/// The plan of `--plan FILE`.
fn plan_of_file(path: &Path) -> Result<EvalPlan> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| user(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| user(format!("{}: not an evaluation plan: {e}", path.display())))
}

pub(crate) fn evaluate(args: EvalArgs) -> Result<()> {
    let mut plan = match &args.plan {
        Some(p) => plan_of_file(p)?,
        None => plan_of_flags(&args)?,
    };
    if let Some(s) = &args.shard {
        plan.shard = Some(Shard::parse(s).map_err(user)?);
    }
    if let Some(out) = &args.out {
        plan.out = out.clone();
    }
    run_plan(&plan, &args.device, args.embed_images)
}

/// Runs `plan` on the device `--device` names and prints its report.
pub(crate) fn run_plan(plan: &EvalPlan, device_spec: &str, embed: bool) -> Result<()> {
    let device = device(device_spec)?;
    let mut bar = super::progress::Progress::new(
        0,
        "{bar:30} {pos}/{len} images {msg} [{elapsed_precise}<{eta_precise}]",
        "evaluation image",
    );
    let load = reneg_mini::rewards::load_choice;
    let manifest = run::run(plan, &device, &load, &mut bar).map_err(lib)?;
    report(&plan.out, &manifest, plan.shard, embed)
}

/// Writes the report of `dir` and prints where it is; a shard's report covers its own units.
fn report(dir: &Path, manifest: &Manifest, shard: Option<Shard>, embed: bool) -> Result<()> {
    let r = run::report(dir, manifest, embed).map_err(lib)?;
    let note = match shard {
        Some(s) => format!(
            " (shard {}/{}: merge the shards with `reneg eval merge`)",
            s.index, s.count
        ),
        None => String::new(),
    };
    println!(
        "{} (and report.html): {}/{} unit(s) complete{note}",
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
    report(&args.out, &manifest, None, args.embed_images)
}
