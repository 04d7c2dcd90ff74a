//! `reneg eval`: generates every (prompt, seed) with every negative from the same noise,
//! scores each image with each reward, and writes the comparison report; `reneg eval merge`
//! combines shard folders into the report an unsharded run gives.

use super::rewards::RewardArg;
use super::{
    check_steps, create_out_dir, device, image_size, lib, load_embedding_for, load_model,
    load_rewards, setup_precision, user, ModelArgs, Precision, SamplerArgs,
};
use anyhow::Result;
use candle_core::{DType, Tensor};
use reneg::eval::{self, Manifest, NegativeSpec, Record, Shard};
use reneg::prompts::{self, Prompt};
use reneg::train::per_sample::adapt;
use reneg::train::step::{noise, to_unit, Objective, Sampling};
use std::collections::BTreeSet;
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

/// A negative ready to use: a fixed embedding, or the start of a per-sample adaptation.
struct Negative {
    embedding: reneg::conditioning::Conditioning,
    per_sample: bool,
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
    let prompt_list = load_prompts(&args)?;
    if args.seeds == 0 {
        return Err(user("--seeds must be at least 1"));
    }
    let device = device(&args.device)?;
    let dtype: DType = setup_precision(args.precision, &device)?;
    create_out_dir(&args.out)?;

    let mut sd = load_model(&args.model, dtype, &device)?;
    args.sampler.apply(&mut sd)?;
    super::check_prompts(&sd, &prompt_list)?;
    check_steps(&mut sd, args.steps)?;
    let first_prompt_image = prompt_list.iter().find_map(|p| p.control_image.clone());
    let control_size = super::control::apply(
        &mut sd,
        &args.control,
        first_prompt_image.as_deref(),
        dtype,
        &device,
    )?;
    let prompt_images =
        super::control::prompt_images(&sd, &args.control, &prompt_list, control_size, &device)?;
    let default_images: Vec<Tensor> = sd.controls().iter().map(|c| c.image.clone()).collect();
    let (height, width) = super::control::check_size(control_size, args.height, args.width)?;
    let (h, w) = image_size(&sd, height, width)?;
    let frames = super::generate::frames_for(&sd, args.frames, &args.model.name()?)?;
    let rewards = load_rewards(&args.reward, &args.reward_model, dtype, &device)?;
    let mut reward_names: Vec<String> = rewards.iter().map(|(r, _)| r.name().to_string()).collect();
    if reward_names.iter().collect::<BTreeSet<_>>().len() != reward_names.len() {
        return Err(user(
            "the same reward is given twice; give each reward once",
        ));
    }
    let reward_flags: Vec<(String, bool)> = rewards
        .iter()
        .map(|(r, _)| (r.name().to_string(), r.evaluation_only()))
        .collect();
    // A clip's temporal consistency is measured with the first reward that has a CLIP image
    // encoder (none: not measured, and the report says so by its absence).
    let consistency_by = if frames.is_some() {
        rewards
            .iter()
            .position(|(r, _)| r.image_encoder().is_some())
    } else {
        None
    };
    if frames.is_some() && consistency_by.is_none() {
        println!("note: no CLIP-based reward given (hps, pickscore, clip, aesthetic): the clips' temporal consistency is not measured");
    }
    let objective = Objective::new(rewards);
    if specs
        .iter()
        .any(|s| matches!(s, NegativeSpec::PerSample(_)))
    {
        objective.check_optimisable().map_err(lib)?;
    }
    let negatives = specs
        .iter()
        .map(|spec| {
            let embedding = match spec {
                NegativeSpec::Embedding(p) | NegativeSpec::PerSample(p) => {
                    load_embedding_for(&sd, p)?
                }
                text => sd.encode(text.text().unwrap_or("")).map_err(lib)?,
            };
            Ok(Negative {
                embedding,
                per_sample: matches!(spec, NegativeSpec::PerSample(_)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // The rewards each embedding was trained on, from its metadata (`reneg train` writes
    // "kind:model:weight" items joined by commas).
    let trained_on: Vec<Vec<String>> = specs
        .iter()
        .map(|spec| match spec {
            NegativeSpec::Embedding(p) | NegativeSpec::PerSample(p) => {
                reneg::embedding::NegativeEmbedding::load(p)
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
        .collect();

    let mut roles = eval::reward_roles(&args.negatives, &specs, &trained_on, &reward_flags);
    if let Some(k) = consistency_by {
        reward_names.push(eval::TEMPORAL_CONSISTENCY.to_string());
        roles.insert(
            eval::TEMPORAL_CONSISTENCY.to_string(),
            format!(
                "Independent: the mean cosine between consecutive frames' image embeddings from {}'s CLIP image encoder (1 = a still clip); no negative is optimised on it.",
                reward_flags[k].0
            ),
        );
    }
    let files = stamped_files(&args, &specs, &prompt_list)?;
    let manifest = Manifest {
        model: args.model.name()?,
        prompts: prompt_list,
        seeds: args.seeds,
        base_seed: args.seed,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: h,
        width: w,
        negatives: args.negatives.clone(),
        rewards: reward_names.clone(),
        adapt: negatives.iter().any(|n| n.per_sample).then_some((
            args.adapt.adapt_steps,
            args.adapt.adapt_patience,
            args.adapt.adapt_lr,
        )),
        roles,
        frames,
        model_options: [
            args.model.options(),
            args.sampler.options(),
            args.control.options(),
        ]
        .concat(),
        precision: args.precision.name().to_string(),
        device: match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu",
            candle_core::DeviceLocation::Cuda { .. } => "cuda",
            candle_core::DeviceLocation::Metal { .. } => "metal",
        }
        .to_string(),
        sampler: sd.scheduler.label(),
        files,
    };
    match Manifest::load(&args.out).map_err(lib)? {
        Some(old) if old != manifest => {
            return Err(user(format!(
                "{}: holds an evaluation with other settings ({}); use another --out, or the same settings to resume",
                args.out.join(eval::MANIFEST).display(),
                old.differences(&manifest).join("; ")
            )))
        }
        Some(_) => {}
        None => manifest.save(&args.out).map_err(lib)?,
    }
    let done: BTreeSet<(usize, u64, usize)> = {
        let by_key = eval::dedup(eval::load_records(&args.out).map_err(lib)?);
        manifest
            .units()
            .into_iter()
            .flat_map(|(p, s)| (0..negatives.len()).map(move |j| (p, s, j)))
            .filter(|&(p, s, j)| {
                reward_names
                    .iter()
                    .all(|r| by_key.contains_key(&(p, s, j, r.clone())))
            })
            .collect()
    };
    let todo: Vec<(usize, u64, usize)> = manifest
        .units()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| shard.is_none_or(|s| s.owns(*i)))
        .flat_map(|(_, (p, s))| (0..negatives.len()).map(move |j| (p, s, j)))
        .filter(|k| !done.contains(k))
        .collect();
    let sampling = Sampling {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: h,
        width: w,
        frames,
        backward: args.adapt.adapt_backward,
        loss_scale: 1.0,
    };
    let adapt_cfg = args.adapt.config(args.steps);
    let bar = super::progress::Progress::new(
        todo.len() as u64,
        "{bar:30} {pos}/{len} images {msg} [{elapsed_precise}<{eta_precise}]",
        "evaluation image",
    );
    if !done.is_empty() {
        bar.println(format!(
            "{}: {} image(s) already done, skipped",
            args.out.display(),
            done.len()
        ));
    }
    for &(p, seed, j) in &todo {
        let prompt = &manifest.prompts[p];
        bar.set_message(format!(
            "prompt {}/{} seed {seed} negative {}",
            p + 1,
            manifest.prompts.len(),
            j + 1
        ));
        super::control::use_prompt_image(&mut sd, prompt, &prompt_images, &default_images);
        let cond = sd.encode(&prompt.text).map_err(lib)?;
        let uncond = if negatives[j].per_sample {
            adapt(
                &mut sd,
                &objective,
                &negatives[j].embedding,
                &prompt.text,
                seed,
                &adapt_cfg,
                &sampling,
            )
            .map_err(lib)?
            .embedding
            .map(|_, t| Ok(t.to_dtype(sd.dtype())?.to_device(&device)?))
            .map_err(lib)?
        } else {
            negatives[j].embedding.clone()
        };
        let start = noise(&sd, &[seed], &sampling).map_err(lib)?;
        let latents = sd
            .sample(
                start,
                args.steps,
                &cond,
                &uncond,
                args.guidance_scale,
                &[seed],
                |_, _| {},
            )
            .map_err(lib)?;
        let decoded = sd.decode(&latents).map_err(lib)?;
        let image = Manifest::image_path(j, p, seed);
        let params = format!(
            "{}\nNegative: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {w}x{h}, Model: {}",
            prompt.text,
            manifest.negatives[j],
            args.steps,
            sd.scheduler.label(),
            args.guidance_scale,
            seed,
            manifest.model
        ) + &frames.map(|n| format!(", Frames: {n}")).unwrap_or_default();
        let path = args.out.join(&image);
        // A clip is scored frame by frame, `[frames, 3, H, W]`, and saved as an animated PNG
        // under the image's name (its first frame is what the grids and plain viewers show).
        let pixels = match frames {
            None => {
                super::generate::save_png(&decoded.get(0)?, &path, &params)?;
                to_unit(&decoded).map_err(lib)?
            }
            Some(_) => {
                let clip = decoded.get(0)?.permute((1, 0, 2, 3))?.contiguous()?;
                let rgbs = (0..clip.dim(0)?)
                    .map(|k| reneg::io::Rgb::from_pixels(&clip.get(k)?))
                    .collect::<reneg::Result<Vec<_>>>()
                    .map_err(lib)?;
                reneg::video::write_apng(&rgbs, 8, &path, Some(&params)).map_err(lib)?;
                to_unit(&clip).map_err(lib)?
            }
        };
        let n = pixels.dim(0)?;
        let texts = vec![prompt.text.clone(); n];
        let mut scores = vec![];
        for (reward, _) in &objective.rewards {
            // The clip's score: the mean over its frames (an image is one frame).
            let score = reward
                .score(&pixels, &texts)
                .map_err(lib)?
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()?;
            scores.push((reward.name().to_string(), score));
        }
        if let Some(k) = consistency_by {
            let features = objective.rewards[k]
                .0
                .image_encoder()
                .expect("chosen for its image encoder")
                .image_features(&pixels)
                .map_err(lib)?;
            let c = reneg::reward::temporal_consistency(&features).map_err(lib)?;
            scores.push((eval::TEMPORAL_CONSISTENCY.to_string(), c));
        }
        let mut records = vec![];
        for (reward, score) in scores {
            records.push(Record {
                prompt_index: p,
                seed,
                negative: j,
                negative_label: manifest.negatives[j].clone(),
                reward,
                score,
                image: image.display().to_string(),
                prompt: prompt.text.clone(),
                category: prompt.category.clone(),
            });
        }
        eval::append_records(&args.out, &records).map_err(lib)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    report(&args.out, &manifest, shard)
}

/// Writes the report of `dir` and prints where it is; a shard's report covers its own units.
fn report(dir: &Path, manifest: &Manifest, shard: Option<Shard>) -> Result<()> {
    let records = eval::load_records(dir).map_err(lib)?;
    let r = eval::output::write(dir, manifest, records).map_err(lib)?;
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
    let mut manifest: Option<Manifest> = None;
    let mut records = vec![];
    for dir in &args.dirs {
        let m = Manifest::load(dir).map_err(lib)?.ok_or_else(|| {
            user(format!(
                "{}: no {} here; give the --out folders of `reneg eval` runs",
                dir.display(),
                eval::MANIFEST
            ))
        })?;
        match &manifest {
            Some(first) if *first != m => {
                return Err(user(format!(
                    "{}: evaluated with other settings than {} ({}); merge only shards of one evaluation",
                    dir.display(),
                    args.dirs[0].display(),
                    first.differences(&m).join("; ")
                )))
            }
            Some(_) => {}
            None => manifest = Some(m),
        }
        for r in eval::load_records(dir).map_err(lib)? {
            let (from, to) = (dir.join(&r.image), args.out.join(&r.image));
            let same = from.canonicalize().ok().is_some()
                && from.canonicalize().ok() == to.canonicalize().ok();
            if !same && from.is_file() {
                let bytes = std::fs::read(&from)
                    .map_err(|e| user(format!("{}: cannot read: {e}", from.display())))?;
                reneg::io::write_atomic(&to, &bytes).map_err(lib)?;
            }
            records.push(r);
        }
    }
    let manifest = manifest.expect("clap requires at least one folder");
    create_out_dir(&args.out)?;
    manifest.save(&args.out).map_err(lib)?;
    let merged: Vec<Record> = eval::dedup(records).into_values().collect();
    let mut text = String::new();
    for r in &merged {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    reneg::io::write_atomic(&args.out.join(eval::RESULTS), text.as_bytes()).map_err(lib)?;
    report(&args.out, &manifest, None)
}
