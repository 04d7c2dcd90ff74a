//! An evaluation: every (prompt, seed) with every negative from the same noise, each image
//! scored by each reward, the records appended as they come (a rerun resumes), and the report.
//! An [`EvalPlan`] says what to run; [`run`] sets the model up from it and writes its
//! [`Manifest`] (everything that determines the images and scores) to the output folder first:
//! a rerun or a merge must agree with it. Shards do a share of the units; [`merge`] joins
//! their folders.

use super::Progress;
use crate::conditioning::Conditioning;
use crate::error::{Error, Result};
use crate::eval::{self, Manifest, NegativeSpec, Record, Shard};
use crate::prompts::Prompt;
use crate::reward::Reward;
use crate::train::per_sample::{adapt, AdaptConfig};
use crate::train::step::{noise, to_unit, Backward, Objective, Sampling};
use crate::Pipeline;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A reward of an evaluation: its kind, as `--reward` names it, and its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardChoice {
    pub kind: String,
    pub model: PathBuf,
}

/// Loads a reward of an evaluation. The caller's, since some kinds (the miniature world's
/// judge) come from crates the library does not know.
pub type RewardLoader<'a> = &'a dyn Fn(&RewardChoice, DType, &Device) -> Result<Box<dyn Reward>>;

/// The sampler of a run: the kind (None: the model's own), DDIM's eta (None: the family's,
/// 1 for VideoCrafter2, 0 for the others), guidance rescale.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplerPlan {
    pub scheduler: Option<crate::scheduler::SchedulerKind>,
    #[serde(default)]
    pub eta: Option<f64>,
    pub guidance_rescale: f64,
}

impl SamplerPlan {
    /// Sets `sd`'s sampler; returns the note to show when reneg stands another sampler in for
    /// the model's.
    pub fn apply(&self, sd: &mut Pipeline) -> Result<Option<String>> {
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(Error::Invalid(format!(
                "--guidance-rescale {}: expected a value from 0 to 1 (0.7 for zero-terminal-SNR models)",
                self.guidance_rescale
            )));
        }
        let eta = self.eta.unwrap_or(sd.defaults().eta);
        let note = sd.set_sampler(self.scheduler, eta)?;
        sd.guidance_rescale = self.guidance_rescale;
        Ok(note)
    }

    /// `key=value` lines for an evaluation's manifest (empty at the defaults).
    pub fn options(&self) -> Vec<String> {
        let mut v = vec![];
        if let Some(k) = self.scheduler {
            v.push(format!("scheduler={k}"));
        }
        if let Some(eta) = self.eta {
            v.push(format!("eta={eta}"));
        }
        if self.guidance_rescale != 0.0 {
            v.push(format!("guidance_rescale={}", self.guidance_rescale));
        }
        v
    }
}

/// Per-sample adaptation's settings (used when a negative is `per-sample:FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptSettings {
    pub steps: usize,
    pub patience: usize,
    pub lr: f64,
    pub backward: Backward,
}

impl AdaptSettings {
    /// The adaptation for a sampler of `sampling_steps` steps.
    pub fn config(&self, sampling_steps: usize) -> AdaptConfig {
        AdaptConfig::for_sampler(self.steps, self.patience, self.lr, sampling_steps)
    }
}

impl Default for AdaptSettings {
    /// 10 steps, patience 3, learning rate 5e-3, the staged backward.
    fn default() -> Self {
        Self {
            steps: 10,
            patience: 3,
            lr: 5e-3,
            backward: Backward::Staged,
        }
    }
}

/// What an evaluation runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPlan {
    pub model: super::model::ModelPlan,
    pub sampler: SamplerPlan,
    pub control: super::control::ControlPlan,
    pub prompts: Vec<Prompt>,
    /// Seeds per prompt (base seed, base seed + 1, ...), the same for every negative.
    pub seeds: usize,
    pub seed: u64,
    /// The negatives compared, the first the baseline: null, handcrafted, prompt:TEXT, an
    /// embedding file, or per-sample:FILE.
    pub negatives: Vec<String>,
    pub rewards: Vec<RewardChoice>,
    /// Sampling steps and guidance (None: the family's, as for generate).
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub frames: Option<usize>,
    /// The frame rate a VideoCrafter2 clip is conditioned on and saved at (None: 28).
    #[serde(default)]
    pub fps: Option<u32>,
    /// SDXL's size conditioning (the image's size by default).
    #[serde(default)]
    pub sizes: crate::family::roles::SizeConditioning,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub adapt: AdaptSettings,
    pub shard: Option<Shard>,
    pub precision: crate::precision::Precision,
    pub out: PathBuf,
}

/// What a run needs besides its manifest.
pub struct EvalRun<'a> {
    pub manifest: &'a Manifest,
    pub out: PathBuf,
    pub shard: Option<Shard>,
    /// The backward arrangement of per-sample adaptation.
    pub backward: Backward,
    /// The reward whose CLIP image encoder measures a clip's temporal consistency.
    pub consistency_by: Option<usize>,
}

/// A negative ready to use: a fixed conditioning, or the start of a per-sample adaptation.
pub struct Negative {
    pub conditioning: Conditioning,
    pub per_sample: bool,
}

/// The manifest's negatives, checked against `sd` and encoded.
pub fn negatives(sd: &Pipeline, specs: &[NegativeSpec]) -> Result<Vec<Negative>> {
    specs
        .iter()
        .map(|spec| {
            let conditioning = match spec {
                NegativeSpec::Embedding(p) | NegativeSpec::PerSample(p) => {
                    sd.negative(&crate::embedding::NegativeEmbedding::load(p)?, p)?
                }
                // null: what the pipeline uses without a negative (SDXL: zeros under
                // force_zeros_for_empty_prompt; the others: the null text "").
                NegativeSpec::Null => sd.no_negative()?,
                text => sd.encode(text.text().unwrap_or(""))?,
            };
            Ok(Negative {
                conditioning,
                per_sample: matches!(spec, NegativeSpec::PerSample(_)),
            })
        })
        .collect()
}

/// The rewards each embedding was trained on, from its metadata (`reneg train` writes
/// "kind:model:weight" items joined by commas); none for a prompt.
pub fn trained_on(specs: &[NegativeSpec]) -> Vec<Vec<String>> {
    specs
        .iter()
        .map(|spec| match spec {
            NegativeSpec::Embedding(p) | NegativeSpec::PerSample(p) => {
                crate::embedding::NegativeEmbedding::load(p)
                    .ok()
                    .and_then(|e| e.metadata.get("reward").cloned())
                    .map(|r| {
                        r.split(',')
                            .filter_map(|item| item.split(':').next())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            }
            _ => vec![],
        })
        .collect()
}

/// Writes the manifest to a new folder, or checks that the folder's is the same (a resume);
/// refuses one with other settings, saying what differs.
pub fn start_or_resume(manifest: &Manifest, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create output folder: {e}")))?;
    match Manifest::load(out)? {
        Some(old) if old != *manifest => Err(Error::file(
            out.join(eval::MANIFEST),
            format!(
                "holds an evaluation with other settings ({}); use another --out, or the same settings to resume",
                old.differences(manifest).join("; ")
            ),
        )),
        Some(_) => Ok(()),
        None => manifest.save(out),
    }
}

/// One image of an evaluation: (prompt index, seed, negative index).
type Unit = (usize, u64, usize);

/// The images of this run (its shard) not yet scored by every reward, and how many were.
fn todo(run: &EvalRun, negatives: usize) -> Result<(Vec<Unit>, usize)> {
    let m = run.manifest;
    let by_key = eval::dedup(eval::load_records(&run.out)?);
    let scored = |&(p, s, j): &Unit| {
        m.rewards
            .iter()
            .all(|r| by_key.contains_key(&(p, s, j, r.clone())))
    };
    let all = |(p, s): (usize, u64)| (0..negatives).map(move |j| (p, s, j));
    let done = m.units().into_iter().flat_map(all).filter(scored).count();
    let todo = m
        .units()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| run.shard.is_none_or(|s| s.owns(*i)))
        .flat_map(|(_, u)| all(u))
        .filter(|k| !scored(k))
        .collect();
    Ok((todo, done))
}

/// Runs the evaluation: `sd` loaded and set up by the caller, `objective` its rewards in the
/// manifest's order, `before_prompt` called before each image (a prompt's own control image).
pub fn evaluate(
    sd: &mut Pipeline,
    run: &EvalRun,
    negatives: &[Negative],
    objective: &Objective,
    before_prompt: &mut dyn FnMut(&mut Pipeline, &Prompt),
    progress: &mut dyn Progress,
) -> Result<()> {
    start_or_resume(run.manifest, &run.out)?;
    let (todo, done) = todo(run, negatives.len())?;
    if done > 0 {
        progress.note(&format!(
            "{}: {done} image(s) already done, skipped",
            run.out.display()
        ));
    }
    let m = run.manifest;
    // The prompts encoded now (the negatives were): a costly encoder is let go before sampling.
    let texts: Vec<&str> = m.prompts.iter().map(|p| p.text.as_str()).collect();
    sd.encode_ahead(&texts)?;
    progress.begin(todo.len() as u64, "evaluation image");
    for &(p, seed, j) in &todo {
        progress.status(&format!(
            "prompt {}/{} seed {seed} negative {}",
            p + 1,
            m.prompts.len(),
            j + 1
        ));
        before_prompt(sd, &m.prompts[p]);
        let pixels = image(sd, run, &negatives[j], objective, (p, seed, j))?;
        let records = score(run, objective, &pixels, (p, seed, j))?;
        eval::append_records(&run.out, &records)?;
        progress.advance(1);
    }
    progress.finish();
    Ok(())
}

fn sampling(m: &Manifest, backward: Backward) -> Sampling {
    Sampling {
        steps: m.steps,
        guidance_scale: m.guidance_scale,
        height: m.height,
        width: m.width,
        frames: m.frames,
        backward,
        loss_scale: 1.0,
    }
}

/// One image (or clip) generated and saved; returns its pixels in [0, 1] as the rewards take
/// them, `[frames, 3, H, W]` (an image is one frame).
fn image(
    sd: &mut Pipeline,
    run: &EvalRun,
    negative: &Negative,
    objective: &Objective,
    (p, seed, j): Unit,
) -> Result<Tensor> {
    let m = run.manifest;
    let prompt = &m.prompts[p];
    let sampling = sampling(m, run.backward);
    let cond = sd.encode(&prompt.text)?;
    let uncond = match (negative.per_sample, m.adapt) {
        (true, Some((steps, patience, lr))) => {
            let cfg = AdaptConfig::for_sampler(steps, patience, lr, m.steps);
            let a = adapt(
                sd,
                objective,
                &negative.conditioning,
                &prompt.text,
                seed,
                &cfg,
                &sampling,
            )?;
            let (dtype, device) = (sd.dtype(), sd.device().clone());
            a.embedding
                .map(|_, t| Ok(t.to_dtype(dtype)?.to_device(&device)?))?
        }
        _ => negative.conditioning.clone(),
    };
    let start = noise(sd, &[seed], &sampling)?;
    let latents = sd.sample(
        start,
        m.steps,
        &cond,
        &uncond,
        m.guidance_scale,
        &[seed],
        |_, _| {},
    )?;
    let decoded = sd.decode(&latents)?;
    let params = format!(
        "{}\nNegative: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        prompt.text,
        m.negatives[j],
        m.steps,
        sd.scheduler.label(),
        m.guidance_scale,
        seed,
        m.width,
        m.height,
        m.model
    ) + &m
        .frames
        .map(|n| format!(", Frames: {n}"))
        .unwrap_or_default();
    let path = run.out.join(Manifest::image_path(j, p, seed));
    // A clip is scored frame by frame and saved as an animated PNG under the image's name
    // (its first frame is what the grids and plain viewers show).
    match m.frames {
        None => {
            super::generate::save_png(&decoded.get(0)?, &path, &params)?;
            to_unit(&decoded)
        }
        Some(_) => {
            let clip = decoded.get(0)?.permute((1, 0, 2, 3))?.contiguous()?;
            let rgbs = (0..clip.dim(0)?)
                .map(|k| crate::io::Rgb::from_pixels(&clip.get(k)?))
                .collect::<Result<Vec<_>>>()?;
            let fps = sd.frame_rate().map_or(sd.defaults().fps, |f| f as u32);
            crate::video::write_apng(&rgbs, fps, &path, Some(&params))?;
            to_unit(&clip)
        }
    }
}

/// Each reward's score of one image (a clip's: the mean over its frames), and the clip's
/// temporal consistency where it is measured.
fn score(
    run: &EvalRun,
    objective: &Objective,
    pixels: &Tensor,
    (p, seed, j): Unit,
) -> Result<Vec<Record>> {
    let m = run.manifest;
    let prompt = &m.prompts[p];
    let texts = vec![prompt.text.clone(); pixels.dim(0)?];
    let mut scores = vec![];
    for (reward, _) in &objective.rewards {
        let score = reward
            .score(pixels, &texts)?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        scores.push((reward.name().to_string(), score));
    }
    if let Some(k) = run.consistency_by {
        let encoder = objective.rewards[k]
            .0
            .image_encoder()
            .ok_or_else(|| Error::Invalid("the consistency reward has no image encoder".into()))?;
        let c = crate::reward::temporal_consistency(&encoder.image_features(pixels)?)?;
        scores.push((eval::TEMPORAL_CONSISTENCY.to_string(), c));
    }
    Ok(scores
        .into_iter()
        .map(|(reward, score)| Record {
            prompt_index: p,
            seed,
            negative: j,
            negative_label: m.negatives[j].clone(),
            reward,
            score,
            image: Manifest::image_path(j, p, seed).display().to_string(),
            prompt: prompt.text.clone(),
            category: prompt.category.clone(),
        })
        .collect())
}

/// Joins the output folders of one evaluation's shards into `out` (images, records, manifest)
/// and returns the manifest; refuses folders of other evaluations, saying what differs.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Manifest> {
    let mut manifest: Option<Manifest> = None;
    let mut records = vec![];
    for dir in dirs {
        let m = Manifest::load(dir)?.ok_or_else(|| {
            Error::file(
                dir,
                format!(
                    "no {} here; give the --out folders of `reneg eval` runs",
                    eval::MANIFEST
                ),
            )
        })?;
        match &manifest {
            Some(first) if *first != m => {
                return Err(Error::file(
                    dir,
                    format!(
                        "evaluated with other settings than {} ({}); merge only shards of one evaluation",
                        dirs[0].display(),
                        first.differences(&m).join("; ")
                    ),
                ))
            }
            Some(_) => {}
            None => manifest = Some(m),
        }
        for r in eval::load_records(dir)? {
            copy_image(&dir.join(&r.image), &out.join(&r.image))?;
            records.push(r);
        }
    }
    let manifest = manifest.ok_or_else(|| Error::Invalid("no folder to merge".into()))?;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::file(out, format!("cannot create output folder: {e}")))?;
    manifest.save(out)?;
    let mut text = String::new();
    for r in eval::dedup(records).values() {
        text.push_str(&serde_json::to_string(r).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    crate::io::write_atomic(&out.join(eval::RESULTS), text.as_bytes())?;
    Ok(manifest)
}

/// Copies a shard's image into the merged folder (nothing to do when they are one file).
fn copy_image(from: &Path, to: &Path) -> Result<()> {
    let same =
        from.canonicalize().ok().is_some() && from.canonicalize().ok() == to.canonicalize().ok();
    if same || !from.is_file() {
        return Ok(());
    }
    let bytes = std::fs::read(from).map_err(|e| Error::file(from, format!("cannot read: {e}")))?;
    crate::io::write_atomic(to, &bytes)
}

/// Writes the report of `dir` (every record there; a shard's covers its own units), the page's
/// images inside it when `embed`.
pub fn report(dir: &Path, manifest: &Manifest, embed: bool) -> Result<crate::eval::report::Report> {
    crate::eval::output::write(dir, manifest, eval::load_records(dir)?, embed)
}

/// The model as a plan sets it up, with its ControlNets' images.
struct Model {
    sd: Pipeline,
    prompt_images: HashMap<PathBuf, Tensor>,
    default_images: Vec<Tensor>,
    size: (usize, usize),
    frames: Option<usize>,
    steps: usize,
    guidance_scale: f64,
}

fn model(
    plan: &EvalPlan,
    dtype: DType,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Model> {
    let mut sd = plan.model.load(dtype, device)?;
    // The model a run uses, first (it may be the built-in one, written on first use).
    progress.note(&format!("model: {}", plan.model.model));
    if let Some(note) = plan.sampler.apply(&mut sd)? {
        progress.warn(&note);
    }
    progress.note(&format!("sampler: {}", sd.scheduler.label()));
    for p in &plan.prompts {
        sd.check_prompt(&p.text)?;
    }
    let defaults = sd.defaults();
    let steps = plan.steps.unwrap_or(defaults.steps);
    sd.scheduler
        .set_timesteps(steps)
        .map_err(|e| Error::Invalid(format!("--steps {steps}: {e}")))?;
    let fps = plan.fps.unwrap_or(defaults.fps);
    sd.set_fps(fps)?;
    sd.set_size_conditioning(plan.sizes)?;
    let first_image = plan.prompts.iter().find_map(|p| p.control_image.clone());
    let control = &plan.control;
    let size = control.apply(&mut sd, first_image.as_deref(), dtype, device)?;
    if let Some(line) = control.summary(size) {
        progress.note(&line);
    }
    let prompt_images = control.prompt_images(&sd, &plan.prompts, size)?;
    let default_images = sd.controls().iter().map(|c| c.image.clone()).collect();
    let (height, width) = super::control::check_size(size, plan.height, plan.width)?;
    let size = sd.image_size(height, width)?;
    let frames = sd.frames(plan.frames)?;
    Ok(Model {
        sd,
        prompt_images,
        default_images,
        size,
        frames,
        steps,
        guidance_scale: plan.guidance_scale.unwrap_or(defaults.guidance_scale),
    })
}

/// The loaded rewards and what the manifest says of them.
struct Rewards {
    objective: Objective,
    names: Vec<String>,
    /// (name, evaluation-only) of each.
    flags: Vec<(String, bool)>,
    consistency_by: Option<usize>,
}

/// The plan's rewards, each once; for clips, which one measures temporal consistency.
fn rewards(
    plan: &EvalPlan,
    frames: Option<usize>,
    (dtype, device): (DType, &Device),
    load: RewardLoader,
    progress: &mut dyn Progress,
) -> Result<Rewards> {
    let rewards = plan
        .rewards
        .iter()
        .map(|r| Ok((load(r, dtype, device)?, 1.0)))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = rewards.iter().map(|(r, _)| r.name().to_string()).collect();
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        return Err(Error::Invalid(
            "the same reward is given twice; give each reward once".into(),
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
        progress.note("note: no CLIP-based reward given (hps, pickscore, clip, aesthetic): the clips' temporal consistency is not measured");
    }
    Ok(Rewards {
        objective: Objective::new(rewards),
        names,
        flags,
        consistency_by,
    })
}

/// The files besides the model that shape the images and scores, each stamped with its
/// content hash: reward models, negatives' files, LoRAs, textual inversions, a VAE,
/// ControlNets and control images (the prompts' own included).
fn stamped_files(plan: &EvalPlan, specs: &[NegativeSpec]) -> Result<Vec<eval::FileStamp>> {
    let mut files: Vec<(&str, PathBuf)> = plan
        .rewards
        .iter()
        .map(|r| ("reward model", r.model.clone()))
        .collect();
    for spec in specs {
        if let NegativeSpec::Embedding(p) | NegativeSpec::PerSample(p) = spec {
            files.push(("negative", p.clone()));
        }
    }
    files.extend(plan.model.files()?);
    files.extend(plan.control.files());
    files.extend(
        plan.prompts
            .iter()
            .filter_map(|p| p.control_image.clone())
            .map(|p| ("control image", p)),
    );
    files.sort();
    files.dedup();
    files
        .iter()
        .map(|(role, p)| eval::FileStamp::of(role, p))
        .collect()
}

/// SDXL's size conditioning as manifest options (none at the defaults).
fn size_options(s: &crate::family::roles::SizeConditioning) -> Vec<String> {
    let mut v = vec![];
    if let Some((h, w)) = s.original {
        v.push(format!("original_size={h},{w}"));
    }
    if let Some((h, w)) = s.target {
        v.push(format!("target_size={h},{w}"));
    }
    if s.crops_top_left != (0, 0) {
        let (t, l) = s.crops_top_left;
        v.push(format!("crops_coords_top_left={t},{l}"));
    }
    v
}

/// The run's manifest: everything that determines its images and scores.
fn manifest(plan: &EvalPlan, m: &Model, r: &Rewards, specs: &[NegativeSpec]) -> Result<Manifest> {
    let mut roles = eval::reward_roles(&plan.negatives, specs, &trained_on(specs), &r.flags);
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
    let a = &plan.adapt;
    Ok(Manifest {
        model: plan.model.model.clone(),
        files: stamped_files(plan, specs)?,
        prompts: plan.prompts.clone(),
        seeds: plan.seeds,
        base_seed: plan.seed,
        steps: m.steps,
        guidance_scale: m.guidance_scale,
        height: m.size.0,
        width: m.size.1,
        negatives: plan.negatives.clone(),
        rewards: names,
        adapt: per_sample.then_some((a.steps, a.patience, a.lr)),
        roles,
        frames: m.frames,
        model_options: [
            plan.model.options(),
            plan.sampler.options(),
            plan.control.options(),
            // The rate a frame-rate-conditioned model's clips depend on.
            m.sd.frame_rate()
                .map(|f| vec![format!("fps={f}")])
                .unwrap_or_default(),
            size_options(&plan.sizes),
        ]
        .concat(),
        precision: plan.precision.name().to_string(),
        device: match m.sd.device().location() {
            candle_core::DeviceLocation::Cpu => "cpu",
            candle_core::DeviceLocation::Cuda { .. } => "cuda",
            candle_core::DeviceLocation::Metal { .. } => "metal",
        }
        .to_string(),
        sampler: m.sd.scheduler.label(),
    })
}

/// Runs the evaluation `plan` says on `device`, loading its rewards with `load`; returns its
/// manifest (what [`report`] needs).
pub fn run(
    plan: &EvalPlan,
    device: &Device,
    load: RewardLoader,
    progress: &mut dyn Progress,
) -> Result<Manifest> {
    let specs = plan
        .negatives
        .iter()
        .map(|s| NegativeSpec::parse(s).map_err(Error::Invalid))
        .collect::<Result<Vec<_>>>()?;
    if plan.prompts.is_empty() {
        return Err(Error::Invalid(
            "no prompts to evaluate: give --prompts FILE or --prompt TEXT (and a --limit above 0)"
                .into(),
        ));
    }
    if plan.seeds == 0 {
        return Err(Error::Invalid("--seeds must be at least 1".into()));
    }
    plan.precision.check(device)?;
    plan.precision.apply(device);
    let dtype = plan.precision.weight_dtype();
    let mut m = model(plan, dtype, device, progress)?;
    let r = rewards(plan, m.frames, (dtype, device), load, progress)?;
    if specs
        .iter()
        .any(|s| matches!(s, NegativeSpec::PerSample(_)))
    {
        r.objective.check_optimisable()?;
    }
    let negatives = negatives(&m.sd, &specs)?;
    let manifest = manifest(plan, &m, &r, &specs)?;
    let eval_run = EvalRun {
        manifest: &manifest,
        out: plan.out.clone(),
        shard: plan.shard,
        backward: plan.adapt.backward,
        consistency_by: r.consistency_by,
    };
    let (images, defaults) = (&m.prompt_images, &m.default_images);
    let mut before =
        |sd: &mut Pipeline, p: &Prompt| super::control::use_prompt_image(sd, p, images, defaults);
    evaluate(
        &mut m.sd,
        &eval_run,
        &negatives,
        &r.objective,
        &mut before,
        progress,
    )?;
    Ok(manifest)
}
