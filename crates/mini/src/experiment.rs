//! The ReNeg experiment in the miniature world, as a plan: train a global negative embedding
//! with the preference reward, then compare null text, the hand-written negative, the global
//! embedding and per-sample adaptation on held-out prompts, scored by the reward and by the
//! independent judge (`OUT/eval`); then, where the world has a ControlNet, the same embedding
//! through it (`OUT/transfer`). Each part is a plan of the core library's runs (a
//! `TrainConfig`, two `EvalPlan`s); [`run`] runs them, the evaluations through the caller's
//! `evaluate` (in this process, or as shard processes of the `reneg` binary).

use reneg::error::{Error, Result};
use reneg::run::control::ControlPlan;
use reneg::run::eval::{AdaptSettings, EvalPlan, RewardChoice};
use reneg::run::model::ModelPlan;
use reneg::run::Progress;
use reneg::train::config::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The hand-written negative of the miniature world: the quality words its captions use.
pub const HAND_WRITTEN: &str = "blurry, noisy, washed out, colour cast, blocky";

/// The control-image prompt file of the transfer part (held-out prompts with their scenes'
/// masks), in the world's `prompts/`.
pub use crate::recipe::CONTROL_PROMPTS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentPlan {
    /// The miniature world's folder.
    pub mini: PathBuf,
    /// Where `train/`, `eval/` and `transfer/` go (each resumes).
    pub out: PathBuf,
    /// ReNeg training steps of the global embedding.
    pub train_steps: u64,
    /// A global embedding to use instead of training one.
    pub embedding: Option<PathBuf>,
    /// Held-out prompts evaluated (the first of `prompts/heldout.txt`).
    pub prompts: usize,
    /// Seeds per held-out prompt.
    pub seeds: usize,
    /// Whether per-sample adaptation is one of the negatives (the slowest part).
    pub per_sample: bool,
}

/// The evaluations of the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The four negatives on the plain pipeline.
    Eval,
    /// Null text, the hand-written negative and the global embedding through the ControlNet.
    Transfer,
}

impl Part {
    pub fn dir(self) -> &'static str {
        match self {
            Part::Eval => "eval",
            Part::Transfer => "transfer",
        }
    }
}

/// A path as a TOML basic string.
fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl ExperimentPlan {
    /// Refuses a folder that is not a miniature world.
    pub fn check(&self) -> Result<()> {
        if self.mini.join("pipeline/model_index.json").is_file() {
            return Ok(());
        }
        Err(Error::file(
            &self.mini,
            format!(
                "not a miniature world (no pipeline/model_index.json); run `reneg mini train --out {}` first",
                self.mini.display()
            ),
        ))
    }

    /// Where the global embedding's training run writes.
    pub fn train_dir(&self) -> PathBuf {
        self.out.join("train")
    }

    /// The global embedding the evaluations compare: the one given, or the training run's.
    pub fn embedding_path(&self) -> PathBuf {
        self.embedding
            .clone()
            .unwrap_or_else(|| self.train_dir().join("embedding.safetensors"))
    }

    /// The training run of the global embedding (the plan `reneg train` runs).
    pub fn train_config(&self) -> Result<TrainConfig> {
        let m = &self.mini;
        let text = format!(
            "model = {}\nprompts = {}\nval_prompts = {}\nout = {}\nsteps = {}\nlr = 0.01\n\
             batch_size = 4\nmicro_batch_size = 4\nsampling_steps = 20\ngrad_step_window = 5\n\
             height = 32\nwidth = 32\nval_every = {}\nval_seeds = 2\n\
             [[rewards]]\nkind = \"hps\"\nmodel = {}\nweight = 1.0\n",
            quoted(&m.join("pipeline")),
            quoted(&m.join("prompts/train.txt")),
            quoted(&m.join("prompts/heldout.txt")),
            quoted(&self.train_dir()),
            self.train_steps,
            (self.train_steps / 4).max(1),
            quoted(&m.join("reward")),
        );
        let source = Path::new("<mini experiment>");
        let plan = TrainConfig::from_toml(&text, source)?;
        TrainConfig::resolve(TrainConfig::from_toml("", source)?, plan, source)
    }

    /// One evaluation of the experiment.
    pub fn eval_plan(&self, part: Part) -> Result<EvalPlan> {
        let m = &self.mini;
        let embedding = self.embedding_path().display().to_string();
        let mut negatives = vec![
            "null".to_string(),
            format!("prompt:{HAND_WRITTEN}"),
            embedding.clone(),
        ];
        if part == Part::Eval && self.per_sample {
            negatives.push(format!("per-sample:{embedding}"));
        }
        let (control, prompt_file) = match part {
            Part::Eval => (ControlPlan::default(), m.join("prompts/heldout.txt")),
            Part::Transfer => (
                ControlPlan {
                    controlnets: vec![m.join("controlnet")],
                    ..ControlPlan::default()
                },
                m.join("prompts").join(CONTROL_PROMPTS),
            ),
        };
        let mut prompts = reneg::prompts::load(&prompt_file)?;
        prompts.truncate(self.prompts);
        let reward = |kind: &str, dir: &str| RewardChoice {
            kind: kind.into(),
            model: m.join(dir),
        };
        Ok(EvalPlan {
            model: ModelPlan::of(&m.join("pipeline").display().to_string()),
            sampler: Default::default(),
            control,
            prompts,
            seeds: self.seeds,
            seed: 0,
            negatives,
            rewards: vec![
                reward("hps", "reward"),
                reward(crate::rewards::JUDGE_QUALITY, "judge"),
                reward(crate::rewards::JUDGE_MATCH, "judge"),
            ],
            steps: Some(20),
            guidance_scale: Some(7.5),
            fps: None,
            sizes: Default::default(),
            frames: None,
            height: Some(32),
            width: Some(32),
            adapt: AdaptSettings::default(),
            shard: None,
            precision: Default::default(),
            out: self.out.join(part.dir()),
        })
    }

    /// Whether the world has the ControlNet the transfer part goes through.
    pub fn has_controlnet(&self) -> bool {
        self.mini.join("controlnet/config.json").is_file()
    }
}

/// Runs the experiment: trains the global embedding unless the plan gives one (or resumes an
/// interrupted training; a finished one is kept), then each evaluation through `evaluate`.
pub fn run(
    plan: &ExperimentPlan,
    train: &reneg::run::train::Setup,
    evaluate: &mut dyn FnMut(&EvalPlan, &mut dyn Progress) -> Result<()>,
    progress: &mut dyn Progress,
) -> Result<()> {
    plan.check()?;
    if plan.embedding.is_none() {
        let dir = plan.train_dir();
        let checkpoint = dir.join("checkpoint.safetensors").is_file();
        if !dir.join("embedding.safetensors").is_file() || checkpoint {
            let setup = reneg::run::train::Setup {
                resume: checkpoint,
                ..train.clone()
            };
            progress.note(&format!(
                "training the global embedding in {} (its config.toml reruns it: reneg train --config)",
                dir.display()
            ));
            let (outcome, _) = reneg::run::train::train(plan.train_config()?, &setup, progress)?;
            progress.note(&format!(
                "trained {} steps ({} skipped); embedding: {}",
                outcome.steps_done,
                outcome.skipped,
                plan.embedding_path().display()
            ));
        }
    }
    evaluate(&plan.eval_plan(Part::Eval)?, progress)?;
    // Transfer (issue 18): the embedding learned on the plain pipeline, unchanged, through the
    // world's ControlNet, against null text and the hand-written negative.
    if plan.has_controlnet() {
        evaluate(&plan.eval_plan(Part::Transfer)?, progress)?;
    } else {
        progress.note(&format!(
            "no ControlNet in {} (`reneg mini train` makes one): the transfer part is skipped",
            plan.mini.display()
        ));
    }
    Ok(())
}
