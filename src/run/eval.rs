//! An evaluation: every (prompt, seed) with every negative from the same noise, each image
//! scored by each reward, the records appended as they come (a rerun resumes), and the report.
//! The [`Manifest`] is the plan: written to the output folder first, and a rerun or a merge
//! must agree with it. Shards do a share of the units; [`merge`] joins their folders.

use super::Progress;
use crate::conditioning::Conditioning;
use crate::error::{Error, Result};
use crate::eval::{self, Manifest, NegativeSpec, Record, Shard};
use crate::prompts::Prompt;
use crate::train::per_sample::{adapt, AdaptConfig};
use crate::train::step::{noise, to_unit, Backward, Objective, Sampling};
use crate::Pipeline;
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

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
    progress.begin(todo.len() as u64, "evaluation image");
    let m = run.manifest;
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
            let cfg = AdaptConfig {
                steps,
                patience,
                lr,
                grad_step_window: m.steps.min(10),
            };
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
            crate::video::write_apng(&rgbs, 8, &path, Some(&params))?;
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

/// Writes the report of `dir` (every record there; a shard's covers its own units).
pub fn report(dir: &Path, manifest: &Manifest) -> Result<crate::eval::report::Report> {
    crate::eval::output::write(dir, manifest, eval::load_records(dir)?)
}
