//! `reneg mini`: the miniature world (issue 8). `mini train` trains its models from scratch;
//! `mini experiment` runs the ReNeg experiment on them.

use super::{device, lib};
use anyhow::Result;
use reneg::run::eval::EvalPlan;
use reneg_mini::experiment::ExperimentPlan;
use reneg_mini::recipe::{self, Budget, RecipeConfig};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum MiniCommand {
    /// Train the miniature world's CLIP, VAE, UNet, reward and judge from scratch (resumes:
    /// models already written are skipped unless --force).
    Train(TrainArgs),
    /// The ReNeg experiment in the miniature world: train a global negative embedding with the
    /// preference reward, then compare null text, the hand-written negative, the global
    /// embedding and per-sample adaptation on held-out prompts, scored by the reward and by
    /// the independent judge (report.md in --out/eval); then, where the world has a
    /// ControlNet, the same embedding through it (--out/transfer).
    Experiment(ExperimentArgs),
}

#[derive(clap::Args)]
pub struct ExperimentArgs {
    /// The miniature world's folder (default: the built-in one, assets/mini).
    #[arg(long)]
    pub mini: Option<PathBuf>,
    /// Output folder (train/ and eval/ inside; resumes).
    #[arg(long, default_value = "runs/mini")]
    pub out: PathBuf,
    /// ReNeg training steps for the global embedding.
    #[arg(long, default_value_t = 400)]
    pub train_steps: u64,
    /// Use this global embedding instead of training one (e.g. the committed
    /// assets/mini/negatives/reneg-global.safetensors).
    #[arg(long)]
    pub embedding: Option<PathBuf>,
    /// Held-out prompts evaluated (from the mini folder's prompts/heldout.txt).
    #[arg(long, default_value_t = 48)]
    pub prompts: usize,
    /// Seeds per held-out prompt.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Leave out the per-sample negative (the slowest part).
    #[arg(long)]
    pub no_per_sample: bool,
    /// cpu, or cuda:N in CUDA builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads per process (default: RAYON_NUM_THREADS if set, else 1). The world's
    /// models are so small that splitting each operation across cores costs more in hand-offs
    /// than it saves (benches/results/mini-threads.txt); the evaluations instead run as one
    /// process per group of this many cores, each on a shard of the (prompt, seed) units,
    /// merged after.
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The CPU thread count `cmd` asks for, if it sets one (read before the worker pool starts).
pub fn threads(cmd: &MiniCommand) -> Option<usize> {
    match cmd {
        MiniCommand::Experiment(a) => match a.threads {
            Some(n) => Some(n.max(1)),
            None if std::env::var_os("RAYON_NUM_THREADS").is_some() => None,
            None => Some(1),
        },
        MiniCommand::Train(_) => None,
    }
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Where the models go (the built-in default model lives in assets/mini).
    #[arg(long, default_value = "assets/mini")]
    pub out: PathBuf,
    /// Seed of every model's initial weights (their data has its own fixed seeds).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Multiplies every model's training steps (1 = the committed models' recipe).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Retrain models that already exist in --out.
    #[arg(long)]
    pub force: bool,
    /// Fine-tune the UNet and the pipeline's text encoder together for this many steps after
    /// the UNet, on zero terminal SNR with v-prediction (docs/mini-world-v4.md; scaled by
    /// --scale). 0 leaves the stage out, as the third world did.
    #[arg(long, default_value_t = Budget::default().joint)]
    pub joint_steps: usize,
    /// cpu, or cuda:N in CUDA builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(cmd: MiniCommand) -> Result<()> {
    match cmd {
        MiniCommand::Train(a) => train(a),
        MiniCommand::Experiment(a) => experiment(a),
    }
}

fn train(a: TrainArgs) -> Result<()> {
    if !(a.scale > 0.0 && a.scale.is_finite()) {
        return Err(super::user(format!(
            "--scale {}: must be a positive number",
            a.scale
        )));
    }
    let dev = device(&a.device)?;
    let cfg = RecipeConfig {
        out: a.out.clone(),
        seed: a.seed,
        budget: Budget {
            joint: a.joint_steps,
            ..Budget::default()
        }
        .scaled(a.scale),
        force: a.force,
    };
    let reports = recipe::run(&cfg, &dev).map_err(lib)?;
    for r in &reports {
        println!(
            "{}: {} steps, {:.0} s, final loss {:.4}, {}",
            r.model,
            r.steps,
            r.seconds,
            r.final_loss,
            serde_json::Value::Object(r.checks.clone())
        );
    }
    if reports.is_empty() {
        println!(
            "every model is already in {} (use --force to retrain)",
            a.out.display()
        );
    }
    Ok(())
}

/// How many processes the experiment's evaluations run in: on the CPU, one per group of
/// `--threads` cores (the world's models run fastest on one thread each, so two cores are
/// best used by two single-threaded shards of the (prompt, seed) units, merged after); on a
/// GPU, one.
fn eval_shards(a: &ExperimentArgs) -> usize {
    if a.device != "cpu" {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_process = candle_core::utils::get_num_threads().max(1);
    (cores / per_process).clamp(1, a.prompts.saturating_mul(a.seeds).max(1))
}

/// Runs the evaluation `plan` describes: in this process when `shards` is 1; else as `shards`
/// processes of this binary (`reneg eval --plan FILE --shard i/n`, each resuming on its own
/// in `OUT-shards/i`), then merged into the plan's folder. The plan is written first, so the
/// printed commands rerun each part by hand.
fn run_eval(plan: &EvalPlan, shards: usize, device: &str) -> Result<()> {
    let out = &plan.out;
    let base = PathBuf::from(format!("{}-shards", out.display()));
    let file = base.join("plan.json");
    let text = serde_json::to_string_pretty(plan)?;
    reneg::io::write_atomic(&file, text.as_bytes()).map_err(lib)?;
    if shards <= 1 {
        println!("reneg eval --plan {} --device {device}", file.display());
        return super::eval::run_plan(plan, device, false);
    }
    let exe = std::env::current_exe().map_err(|e| {
        anyhow::anyhow!("cannot find this program to run the evaluation's shards: {e}")
    })?;
    let dirs: Vec<PathBuf> = (0..shards).map(|i| base.join(i.to_string())).collect();
    let mut children = Vec::new();
    let mut failed = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let argv: Vec<String> = vec![
            "eval".into(),
            "--plan".into(),
            file.display().to_string(),
            "--shard".into(),
            format!("{i}/{shards}"),
            "--out".into(),
            dir.display().to_string(),
            "--device".into(),
            device.into(),
        ];
        println!("reneg {}", argv.join(" "));
        match std::process::Command::new(&exe).args(&argv).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                failed.push(format!("shard {i} did not start: {e}"));
                break;
            }
        }
    }
    wait_all(children, &mut failed);
    if !failed.is_empty() {
        anyhow::bail!(
            "the evaluation's shards failed ({}); rerun the same command to resume them",
            failed.join("; ")
        );
    }
    println!(
        "reneg eval merge --out {} {}",
        out.display(),
        base.display()
    );
    super::eval::merge(super::eval::MergeArgs {
        dirs,
        out: out.to_path_buf(),
        embed_images: false,
    })
}

/// Waits for every shard started, so none is left running behind an error.
fn wait_all(children: Vec<std::process::Child>, failed: &mut Vec<String>) {
    for (i, mut child) in children.into_iter().enumerate() {
        match child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => failed.push(format!("shard {i}: {status}")),
            Err(e) => failed.push(format!("shard {i}: {e}")),
        }
    }
}

fn experiment(a: ExperimentArgs) -> Result<()> {
    let plan = ExperimentPlan {
        mini: match a.mini.clone() {
            Some(m) => m,
            None => super::builtin::mini_root()?,
        },
        out: a.out.clone(),
        train_steps: a.train_steps,
        embedding: a.embedding.clone(),
        prompts: a.prompts,
        seeds: a.seeds,
        per_sample: !a.no_per_sample,
    };
    plan.check().map_err(lib)?;
    super::create_out_dir(&a.out)?;
    let setup = reneg::run::train::Setup::single(device(&a.device)?);
    let shards = eval_shards(&a);
    // An evaluation's own error (a failed shard) is returned as it was, not as the library's.
    let mut failure: Option<anyhow::Error> = None;
    let mut evaluate = |p: &EvalPlan, _: &mut dyn reneg::run::Progress| -> reneg::Result<()> {
        match run_eval(p, shards, &a.device) {
            Ok(()) => {
                println!("report: {}", p.out.join("report.md").display());
                Ok(())
            }
            Err(e) => {
                let message = format!("{e:#}");
                failure = Some(e);
                Err(reneg::Error::Invalid(message))
            }
        }
    };
    let mut bar = super::progress::Progress::new(
        0,
        "{bar:30} step {pos}/{len} {msg} {per_sec} [{elapsed_precise}<{eta_precise}]",
        "training step",
    );
    let result = reneg_mini::experiment::run(&plan, &setup, &mut evaluate, &mut bar);
    match (result, failure) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => r.map_err(lib),
    }
}
