//! `reneg mini`: the miniature world (issue 8). `mini train` trains its models from scratch;
//! `mini experiment` runs the ReNeg experiment on them.

use super::{device, lib};
use anyhow::Result;
use reneg_mini::recipe::{self, Budget, RecipeConfig};
use std::path::{Path, PathBuf};

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

/// The hand-written negative of the miniature world: the quality words its captions use.
pub const HAND_WRITTEN: &str = "blurry, noisy, washed out, colour cast, blocky";

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

#[derive(clap::Parser)]
struct TrainCli {
    #[command(flatten)]
    args: super::train::TrainArgs,
}

#[derive(clap::Parser)]
struct EvalCli {
    #[command(flatten)]
    args: super::eval::EvalArgs,
}

/// The `reneg train` arguments of the experiment (also printed, so it can be rerun by hand).
pub fn experiment_train_args(mini: &Path, out: &Path, steps: u64, device: &str) -> Vec<String> {
    let p = |x: PathBuf| x.display().to_string();
    let mut v: Vec<String> = vec![
        "train".into(),
        "--model".into(),
        p(mini.join("pipeline")),
        "--reward".into(),
        "hps".into(),
        "--reward-model".into(),
        p(mini.join("reward")),
        "--prompts".into(),
        p(mini.join("prompts/train.txt")),
        "--val-prompts".into(),
        p(mini.join("prompts/heldout.txt")),
        "--out".into(),
        p(out.to_path_buf()),
        "--device".into(),
        device.into(),
    ];
    for (k, val) in [
        ("--steps", steps.to_string()),
        ("--lr", "0.01".into()),
        ("--batch-size", "4".into()),
        ("--micro-batch-size", "4".into()),
        ("--sampling-steps", "20".into()),
        ("--grad-step-window", "5".into()),
        ("--height", "32".into()),
        ("--width", "32".into()),
        ("--val-every", (steps / 4).max(1).to_string()),
        ("--val-seeds", "2".into()),
    ] {
        v.push(k.into());
        v.push(val);
    }
    v
}

/// The `reneg eval` arguments of the experiment; with `controlnet`, its transfer part: the
/// same negatives through the world's ControlNet, each held-out prompt with its scene's mask.
#[allow(clippy::too_many_arguments)]
pub fn experiment_eval_args(
    mini: &Path,
    embedding: &Path,
    out: &Path,
    prompts: usize,
    seeds: usize,
    per_sample: bool,
    controlnet: Option<&Path>,
    device: &str,
) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    let mut v: Vec<String> = vec!["eval".into(), "--model".into(), p(&mini.join("pipeline"))];
    let mut negatives = vec![
        "null".to_string(),
        format!("prompt:{HAND_WRITTEN}"),
        p(embedding),
    ];
    if per_sample {
        negatives.push(format!("per-sample:{}", p(embedding)));
    }
    for n in negatives {
        v.push("--negative".into());
        v.push(n);
    }
    for (kind, dir) in [
        ("hps", "reward"),
        ("judge-quality", "judge"),
        ("judge-match", "judge"),
    ] {
        v.extend([
            "--reward".into(),
            kind.into(),
            "--reward-model".into(),
            p(&mini.join(dir)),
        ]);
    }
    let prompt_file = match controlnet {
        Some(cn) => {
            v.extend(["--controlnet".into(), p(cn)]);
            mini.join("prompts").join(recipe::CONTROL_PROMPTS)
        }
        None => mini.join("prompts/heldout.txt"),
    };
    for (k, val) in [
        ("--prompts", p(&prompt_file)),
        ("--limit", prompts.to_string()),
        ("--seeds", seeds.to_string()),
        ("--steps", "20".into()),
        ("--height", "32".into()),
        ("--width", "32".into()),
        ("--out", p(out)),
        ("--device", device.into()),
    ] {
        v.push(k.into());
        v.push(val);
    }
    v
}

/// The command line as a shell would take it back (arguments with spaces quoted).
fn shell_line(argv: &[String]) -> String {
    let quoted: Vec<String> = argv
        .iter()
        .map(|a| {
            if a.contains([' ', '\'', '"', '$', '\\']) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect();
    format!("reneg {}", quoted.join(" "))
}

fn parse<T: clap::Parser>(argv: &[String]) -> Result<T> {
    T::try_parse_from(argv.iter().map(String::as_str))
        .map_err(|e| super::user(format!("internal argument error: {e}")))
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

/// Runs the evaluation `args(out)` describes into `out`: in this process when `shards` is 1;
/// else as `shards` processes of this binary, shard i of n each into `out`-shards/i (each
/// resumes on its own, as `reneg eval` does), then `reneg eval merge` into `out`.
fn run_eval(out: &Path, shards: usize, args: impl Fn(&Path) -> Vec<String>) -> Result<()> {
    if shards <= 1 {
        let argv = args(out);
        println!("{}", shell_line(&argv));
        return super::eval::evaluate(parse::<EvalCli>(&argv)?.args);
    }
    let exe = std::env::current_exe().map_err(|e| {
        anyhow::anyhow!("cannot find this program to run the evaluation's shards: {e}")
    })?;
    let base = PathBuf::from(format!("{}-shards", out.display()));
    let dirs: Vec<PathBuf> = (0..shards).map(|i| base.join(i.to_string())).collect();
    let mut children = Vec::new();
    let mut failed = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut argv = args(dir);
        argv.extend(["--shard".into(), format!("{i}/{shards}")]);
        println!("{}", shell_line(&argv));
        match std::process::Command::new(&exe).args(&argv).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                failed.push(format!("shard {i} did not start: {e}"));
                break;
            }
        }
    }
    // Every shard started is waited for, so none is left running behind an error.
    for (i, mut child) in children.into_iter().enumerate() {
        match child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => failed.push(format!("shard {i}: {status}")),
            Err(e) => failed.push(format!("shard {i}: {e}")),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "the evaluation's shards failed ({}); rerun the same command to resume them",
            failed.join("; ")
        );
    }
    let mut argv: Vec<String> = vec!["eval".into(), "merge".into(), "--out".into()];
    argv.push(out.display().to_string());
    argv.extend(dirs.iter().map(|d| d.display().to_string()));
    println!("{}", shell_line(&argv));
    super::eval::merge(super::eval::MergeArgs {
        dirs,
        out: out.to_path_buf(),
    })
}

fn experiment(a: ExperimentArgs) -> Result<()> {
    let mini = match a.mini.clone() {
        Some(m) => m,
        None => super::builtin::mini_root()?,
    };
    if !mini.join("pipeline/model_index.json").is_file() {
        return Err(super::user(format!(
            "{}: not a miniature world (no pipeline/model_index.json); run `reneg mini train --out {}` first",
            mini.display(),
            mini.display()
        )));
    }
    super::create_out_dir(&a.out)?;
    let embedding = match &a.embedding {
        Some(e) => e.clone(),
        None => {
            let train_out = a.out.join("train");
            let mut argv = experiment_train_args(&mini, &train_out, a.train_steps, &a.device);
            if train_out.join("checkpoint.safetensors").is_file() {
                argv.push("--resume".into());
            }
            if !train_out.join("embedding.safetensors").is_file()
                || train_out.join("checkpoint.safetensors").is_file()
            {
                println!("{}", shell_line(&argv));
                super::train::run(parse::<TrainCli>(&argv)?.args)?;
            }
            train_out.join("embedding.safetensors")
        }
    };
    let shards = eval_shards(&a);
    let eval_args = |out: &Path, per_sample: bool, controlnet: Option<&Path>| {
        experiment_eval_args(
            &mini, &embedding, out, a.prompts, a.seeds, per_sample, controlnet, &a.device,
        )
    };
    let eval_out = a.out.join("eval");
    run_eval(&eval_out, shards, |out| {
        eval_args(out, !a.no_per_sample, None)
    })?;
    println!("report: {}", eval_out.join("report.md").display());
    // Transfer (issue 18): the embedding learned on the plain pipeline, unchanged, through the
    // world's ControlNet, against null text and the hand-written negative.
    let controlnet = mini.join("controlnet");
    if controlnet.join("config.json").is_file() {
        run_eval(&a.out.join("transfer"), shards, |out| {
            eval_args(out, false, Some(&controlnet))
        })?;
        println!(
            "transfer report: {}",
            a.out.join("transfer").join("report.md").display()
        );
    } else {
        println!(
            "no ControlNet in {} (`reneg mini train` makes one): the transfer part is skipped",
            mini.display()
        );
    }
    Ok(())
}
