//! ReNeg training: the step's gradient against every pipeline parity case, learning on a tiny
//! pipeline with a tiny reward, exact resume, atomic checkpoints, non-finite steps, and
//! per-sample adaptation.

mod common;

use common::{max_abs, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use reneg::reward::load::load_aesthetic;
use reneg::reward::{LinearReward, Reward};
use reneg::train::checkpoint::Checkpoint;
use reneg::train::config::TrainConfig;
use reneg::train::global::{train, Prompts, Validation};
use reneg::train::per_sample::{adapt, AdaptConfig};
use reneg::train::step::{reneg_gradient_from, Backward, Objective, Pixels, Sampling};
use reneg::Pipeline;
use std::cell::Cell;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

const SD15: &str = "tests/fixtures/parity/sd15-tiny/pipeline";
const AESTHETIC: &str = "tests/fixtures/parity/reward-aesthetic/reward";

/// The tiny aesthetic reward, returning NaN on the listed calls (counted from 0).
struct FlakyReward {
    inner: Box<dyn Reward>,
    calls: Cell<usize>,
    nan_on: Vec<usize>,
}

impl Reward for FlakyReward {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn score(&self, images: &Tensor, prompts: &[String]) -> reneg::Result<Tensor> {
        let c = self.calls.get();
        self.calls.set(c + 1);
        let s = self.inner.score(images, prompts)?;
        if self.nan_on.contains(&c) {
            Ok((s * f64::NAN)?)
        } else {
            Ok(s)
        }
    }
}

fn aesthetic() -> Box<dyn Reward> {
    Box::new(load_aesthetic(Path::new(AESTHETIC), DType::F32, &Device::Cpu).unwrap())
}

fn tiny() -> Pipeline {
    Pipeline::load(Path::new(SD15), DType::F32, &Device::Cpu).unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny setup, with `extra` TOML keys overriding it.
fn config(out: &Path, extra: &str) -> TrainConfig {
    let base = format!(
        r#"
model = "{SD15}"
prompts = "unused.txt"
out = "{}"
batch_size = 2
micro_batch_size = 1
sampling_steps = 6
grad_step_window = 3
height = 32
width = 32
lr = 0.05
val_every = 0
[[rewards]]
kind = "aesthetic"
model = "{AESTHETIC}"
"#,
        out.display()
    );
    let src = Path::new("test.toml");
    let table = TrainConfig::from_toml(&base, src).unwrap();
    TrainConfig::resolve(table, TrainConfig::from_toml(extra, src).unwrap(), src).unwrap()
}

fn prompts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const TRAIN: &[&str] = &[
    "a red cube on a table",
    "a blue ball in the grass",
    "a green tree by a lake",
    "a cat on a sofa",
];

#[test]
fn training_step_gradient_equals_each_parity_case() {
    let mut ran = vec![];
    for dir in common::parity_case_dirs() {
        if !common::is_pipeline_case(&dir) {
            continue;
        }
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let exp: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let mut sd = common::load_case_pipeline(&dir, DType::F32, &Device::Cpu);
        // Training through a ControlNet: the gradient reaches the negative through both.
        common::add_case_controlnet(&mut sd, &dir);
        sd.guidance_rescale = meta["guidance_rescale"].as_f64().unwrap_or(0.0);
        // A video's objective is the mean over frames of a per-frame reward; the case's loss
        // sums over frames: the same with the weight [1, 3, F, H, W] as F per-frame weights
        // [F, 3, H, W] (the batch is one video) and the reward weighted by F.
        let frames = meta["num_frames"].as_u64().map(|f| f as usize);
        let weight = &exp["reward_weight"];
        let (weight, scale) = match frames {
            None => (weight.clone(), 1.0),
            Some(f) => {
                let (_, c, _, h, wd) = weight.dims5().unwrap();
                let per_frame = weight
                    .permute((0, 2, 1, 3, 4))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                (per_frame.reshape((f, c, h, wd)).unwrap(), f as f64)
            }
        };
        let objective = Objective {
            rewards: vec![(Box::new(LinearReward(weight)), scale)],
            pixels: Pixels::Raw,
        };
        // Both arrangements of the backward give the PyTorch gradient, also with the loss
        // scaled in the backward (fp16's loss scaling; the gradient comes back unscaled).
        let arrangements = [
            (Backward::Staged, 1.0),
            (Backward::OnePass, 1.0),
            (Backward::Staged, 65536.0),
            (Backward::OnePass, 1024.0),
        ];
        for (backward, loss_scale) in arrangements {
            let s = Sampling {
                steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
                guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
                height: meta["height"].as_u64().unwrap() as usize,
                width: meta["width"].as_u64().unwrap() as usize,
                frames,
                backward,
                loss_scale,
            };
            let r = reneg_gradient_from(
                &mut sd,
                &objective,
                &exp["negative_prompt_embeds"].clone().into(),
                &[meta["prompt"].as_str().unwrap().to_string()],
                exp["init_latents"].clone(),
                &[0],
                meta["grad_step_index"].as_u64().unwrap() as usize,
                &s,
            )
            .unwrap();
            let want = &exp["grad_negative_prompt_embeds"];
            assert_eq!(r.grad.len(), 1, "an SD negative has one learned part");
            let diff = max_abs_diff(&r.grad[0], want);
            let scale = max_abs(want).max(1e-30);
            let loss = exp["loss"].to_scalar::<f32>().unwrap() as f64;
            let loss_err = (r.loss - loss).abs() / loss.abs().max(1.0);
            println!(
                "{} ({backward:?}): training-step gradient max rel err {:.3e}, loss {loss_err:.3e}",
                dir.display(),
                diff / scale
            );
            // Measured on the committed cases: gradient at most 2.0e-5 (CI's output at d286acd,
            // both kernel choices; the VideoCrafter cases 3.7e-5, their 7 and 4 lvdm steps in
            // place), loss at most 3.4e-5 of max(|loss|, 1) (videocrafter2-tiny-f16); cases given
            // through RENEG_PARITY_DIRS keep the documented 1e-3 for the gradient.
            let (tol, loss_tol) = if common::is_committed_case(&dir) {
                (2e-4, 1e-4)
            } else {
                (1e-3, 1e-4)
            };
            assert!(diff / scale < tol, "{}: {}", dir.display(), diff / scale);
            assert!(loss_err <= loss_tol, "loss {} vs {loss}", r.loss);
        }
        ran.push(dir.clone());
    }
    let missing = common::missing_cases(&common::COMMITTED_PIPELINE_CASES, &ran);
    assert!(
        missing.is_empty(),
        "committed cases that did not run: {missing:?}"
    );
}

/// SDXL's training step: the gradient reaches both learned parts of the negative (embeddings
/// and pooled embedding), as diffusers' autograd gives them, in both backward arrangements.
#[test]
fn sdxl_training_step_gradient_equals_each_parity_case() {
    use reneg::conditioning::Conditioning;
    use reneg::family::roles::SizeConditioning;
    let mut ran = vec![];
    for dir in common::parity_case_dirs() {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        if meta["kind"] != "sdxl" {
            continue;
        }
        let exp: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let mut sd = common::load_case_pipeline(&dir, DType::F32, &Device::Cpu);
        sd.guidance_rescale = meta["guidance_rescale"].as_f64().unwrap_or(0.0);
        let pair = |k: &str| {
            meta[k].as_array().map(|a| {
                (
                    a[0].as_u64().unwrap() as usize,
                    a[1].as_u64().unwrap() as usize,
                )
            })
        };
        sd.set_size_conditioning(SizeConditioning {
            original: pair("original_size"),
            target: pair("target_size"),
            crops_top_left: pair("crops_coords_top_left").unwrap_or((0, 0)),
        })
        .unwrap();
        let objective = Objective {
            rewards: vec![(Box::new(LinearReward(exp["reward_weight"].clone())), 1.0)],
            pixels: Pixels::Raw,
        };
        let negative = Conditioning {
            embeds: exp["negative_prompt_embeds"].clone(),
            pooled: Some(exp["negative_pooled_prompt_embeds"].clone()),
            mask: None,
        };
        for backward in [Backward::Staged, Backward::OnePass] {
            let s = Sampling {
                steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
                guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
                height: meta["height"].as_u64().unwrap() as usize,
                width: meta["width"].as_u64().unwrap() as usize,
                frames: None,
                backward,
                loss_scale: 1.0,
            };
            let r = reneg_gradient_from(
                &mut sd,
                &objective,
                &negative,
                &[meta["prompt"].as_str().unwrap().to_string()],
                exp["init_latents"].clone(),
                &[0],
                meta["grad_step_index"].as_u64().unwrap() as usize,
                &s,
            )
            .unwrap();
            assert_eq!(r.grad.len(), 2, "an SDXL negative has two learned parts");
            for (got, name) in r.grad.iter().zip([
                "grad_negative_prompt_embeds",
                "grad_negative_pooled_prompt_embeds",
            ]) {
                let want = &exp[name];
                let err = max_abs_diff(got, want) / max_abs(want).max(1e-30);
                println!(
                    "{} ({backward:?}): training-step {name} max rel err {err:.3e}",
                    dir.display()
                );
                let tol = if common::is_committed_case(&dir) {
                    2e-4
                } else {
                    1e-3
                };
                assert!(err < tol, "{}: {name} {err}", dir.display());
            }
        }
        ran.push(dir.clone());
    }
    let missing = common::missing_cases(&common::COMMITTED_SDXL_CASES, &ran);
    assert!(
        missing.is_empty(),
        "committed cases that did not run: {missing:?}"
    );
}

fn prompt_file(name: &str) -> Vec<String> {
    reneg::prompts::load(&Path::new("tests/fixtures/train").join(name))
        .unwrap()
        .into_iter()
        .map(|p| p.text)
        .collect()
}

#[test]
fn hundred_steps_raise_the_held_out_reward_above_null_text() {
    // 100 steps of batch 2 on 24 templated prompts ("a red cube on a table"); validated on 8
    // other prompts of the same template x 2 seeds that training never draws. Deterministic.
    let train_prompts = prompt_file("train_prompts.txt");
    let held_out = prompt_file("heldout_prompts.txt");
    assert!(held_out.iter().all(|p| !train_prompts.contains(p)));
    let out = tmp("learn");
    let cfg = config(
        &out,
        "steps = 100\nval_every = 100\nval_seeds = 2\ncheckpoint_every = 100\nbatch_size = 2\nmicro_batch_size = 2\nsampling_steps = 10",
    );
    let mut sd = tiny();
    let objective = Objective::new(vec![(aesthetic(), 1.0)]);
    let init = sd.encode("").unwrap();
    let outcome = train(
        &cfg,
        &mut sd,
        &objective,
        Prompts {
            train: &train_prompts,
            val: &held_out,
        },
        init,
        false,
        |_, _| ControlFlow::Continue(()),
    )
    .unwrap();
    let Validation {
        null_text,
        embedding,
        ..
    } = outcome.last_validation.unwrap();
    println!("held-out aesthetic reward: null text {null_text:.4}, ReNeg {embedding:.4}");
    // Margin: 0.1 above the null-text start (this reward spans about -1..1 on these images).
    assert!(
        embedding > null_text + 0.1,
        "null {null_text}, trained {embedding}"
    );
    for f in [
        "embedding.safetensors",
        "embedding.bin",
        "config.toml",
        "metrics.jsonl",
        "validation.jsonl",
        "checkpoint.safetensors",
        "reward_curve.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 100);
}

/// The tiny aesthetic reward, counting the batches it scores.
struct CountingReward {
    inner: Box<dyn Reward>,
    calls: std::rc::Rc<Cell<usize>>,
}

impl Reward for CountingReward {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn score(&self, images: &Tensor, prompts: &[String]) -> reneg::Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.score(images, prompts)
    }
}

/// What a run did: its embedding, the step it began at, the steps `on_step` saw, and how
/// many batches the reward scored (one per micro-batch of every step computed).
struct Ran {
    embedding: Tensor,
    started_at: u64,
    steps: Vec<u64>,
    scored: usize,
}

fn run(cfg: &TrainConfig, resume: bool, stop_after: Option<u64>) -> Ran {
    let mut sd = tiny();
    let calls = std::rc::Rc::new(Cell::new(0));
    let reward = CountingReward {
        inner: aesthetic(),
        calls: calls.clone(),
    };
    let objective = Objective::new(vec![(Box::new(reward) as Box<dyn Reward>, 1.0)]);
    let init = sd.encode("").unwrap();
    let mut steps = vec![];
    let outcome = train(
        cfg,
        &mut sd,
        &objective,
        Prompts {
            train: &prompts(TRAIN),
            val: &[],
        },
        init,
        resume,
        |m, _| {
            steps.push(m.step);
            if stop_after == Some(m.step) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    Ran {
        embedding: outcome.embedding.embeds,
        started_at: outcome.started_at,
        steps,
        scored: calls.get(),
    }
}

/// Catches a resume that restarts from step 0 (a deterministic restart ends with the same
/// files): the resumed run must begin at the checkpoint's step, compute no earlier step, and
/// leave the metrics of the steps before it as the first run wrote them.
#[test]
fn interrupted_and_resumed_run_ends_bit_for_bit_equal() {
    let a = tmp("whole");
    let whole = run(&config(&a, "steps = 6\ncheckpoint_every = 2"), false, None);
    assert_eq!((whole.started_at, whole.steps.len()), (0, 6));
    let b = tmp("resumed");
    let cfg = config(&b, "steps = 6\ncheckpoint_every = 2");
    // Interrupted after step index 4 (5 steps done); the last checkpoint holds 4.
    let first = run(&cfg, false, Some(4));
    assert_eq!(first.steps, [0, 1, 2, 3, 4]);
    assert_eq!(
        Checkpoint::load(&b.join("checkpoint.safetensors"))
            .unwrap()
            .step,
        4
    );
    // Each line holds its step's wall time: a step run again writes another line.
    let before: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let resumed = run(&cfg, true, None);
    assert_eq!(resumed.started_at, 4, "the resumed run's first step");
    assert_eq!(resumed.steps, [4, 5], "steps the resumed run computed");
    assert_eq!(
        resumed.scored,
        2 * cfg.micro_batches(),
        "reward batches of the resumed run: two steps' micro-batches"
    );
    let diff = max_abs_diff(&whole.embedding, &resumed.embedding);
    assert_eq!(diff, 0.0, "resumed run differs");
    let after: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        after[..4],
        before[..4],
        "the metrics of steps 0-3 are the first run's, not written again"
    );
    let steps: Vec<u64> = after
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (0..6).collect::<Vec<_>>(),
        "metrics hold each step once"
    );
    // A different config refuses to resume from this checkpoint.
    let other = config(&b, "steps = 6\ncheckpoint_every = 2\nlr = 0.01");
    let mut sd = tiny();
    let objective = Objective::new(vec![(aesthetic(), 1.0)]);
    let init = sd.encode("").unwrap();
    let err = train(
        &other,
        &mut sd,
        &objective,
        Prompts {
            train: &prompts(TRAIN),
            val: &[],
        },
        init,
        true,
        |_, _| ControlFlow::Continue(()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("another config"), "{err}");
}

#[test]
fn a_writer_killed_mid_write_leaves_the_previous_checkpoint_readable() {
    let dir = tmp("atomic");
    let path = dir.join("checkpoint.safetensors");
    let emb = Tensor::ones((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let opt = reneg::train::optim::AdamW::new(Default::default(), &emb).unwrap();
    let first = Checkpoint {
        embedding: emb.clone().into(),
        optimizer: vec![opt.clone()],
        step: 7,
        bad_in_row: 0,
        loss_scaler: reneg::precision::LossScaler {
            scale: 512.0,
            good_steps: 3,
            growth_interval: 2000,
        },
        config: "a".into(),
    };
    first.save(&path).unwrap();
    // A second write dies halfway (the process is gone before the rename).
    let err = reneg::io::write_atomic_with(&path, |f| {
        use std::io::Write;
        f.write_all(b"partial checkpoint bytes")?;
        Err(std::io::Error::other("killed"))
    });
    assert!(err.is_err());
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.step, 7);
    assert_eq!(back.loss_scaler, first.loss_scaler);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "checkpoint.safetensors")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run() {
    // Micro-batches per step: 2; the reward fails on both of step 1's calls.
    let out = tmp("nan");
    let cfg = config(&out, "steps = 4\ncheckpoint_every = 4\nmax_bad_steps = 2");
    let mut sd = tiny();
    let flaky = FlakyReward {
        inner: aesthetic(),
        calls: Cell::new(0),
        nan_on: vec![2, 3],
    };
    let objective = Objective::new(vec![(Box::new(flaky), 1.0)]);
    let init = sd.encode("").unwrap();
    let mut embeddings = vec![];
    let outcome = train(
        &cfg,
        &mut sd,
        &objective,
        Prompts {
            train: &prompts(TRAIN),
            val: &[],
        },
        init,
        false,
        |m, _| {
            embeddings.push(m.clone());
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(outcome.skipped, 1);
    assert!(embeddings[1].skipped && !embeddings[0].skipped && !embeddings[2].skipped);
    assert!(outcome
        .embedding
        .embeds
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));

    // Two bad steps in a row stop the run, keeping the last good embedding.
    let out = tmp("nan-stop");
    let cfg = config(&out, "steps = 6\ncheckpoint_every = 6\nmax_bad_steps = 2");
    let flaky = FlakyReward {
        inner: aesthetic(),
        calls: Cell::new(0),
        nan_on: (2..100).collect(),
    };
    let objective = Objective::new(vec![(Box::new(flaky), 1.0)]);
    let mut last_good = None;
    let init = sd.encode("").unwrap();
    let err = train(
        &cfg,
        &mut sd,
        &objective,
        Prompts {
            train: &prompts(TRAIN),
            val: &[],
        },
        init,
        false,
        |m, _| {
            if !m.skipped {
                last_good = Some(m.step);
            }
            ControlFlow::Continue(())
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("2 steps in a row"), "{err}");
    assert_eq!(last_good, Some(0));
    let saved =
        reneg::embedding::NegativeEmbedding::load(&out.join("embedding.safetensors")).unwrap();
    assert!(saved
        .tensor
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    assert_eq!(saved.metadata.get("steps").map(String::as_str), Some("3"));
}

/// A learning rate at which adaptation overshoots on the tiny pipeline (found by trying).
const LR_OVERSHOOT: f64 = 1.0;

#[test]
fn per_sample_adaptation_improves_and_keeps_the_best_embedding() {
    let mut sd = tiny();
    let objective = Objective::new(vec![(aesthetic(), 1.0)]);
    let start = sd.encode("").unwrap();
    let s = Sampling {
        steps: 6,
        guidance_scale: 7.5,
        height: 32,
        width: 32,
        frames: None,
        backward: Default::default(),
        loss_scale: 1.0,
    };
    let cfg = AdaptConfig {
        steps: 4,
        patience: 2,
        lr: 0.05,
        grad_step_window: 3,
    };
    let mut improved = 0;
    for (i, p) in [
        "a red cube on a table",
        "a dog running on the beach",
        "a house with a red roof",
    ]
    .iter()
    .enumerate()
    {
        let a = adapt(&mut sd, &objective, &start, p, 100 + i as u64, &cfg, &s).unwrap();
        println!(
            "{p}: start {:.4}, steps {:?}, kept {:.4}",
            a.start_reward, a.history, a.best_reward
        );
        assert!(a.history.len() <= cfg.steps);
        // The kept reward is the best seen, the start included (not the last step's).
        let best = a.history.iter().copied().fold(a.start_reward, f64::max);
        assert_eq!(a.best_reward, best, "{p}");
        // The returned embedding really gives the reported reward.
        let again = reneg::train::step::sampled_reward(
            &mut sd,
            &objective,
            &a.embedding,
            &[p.to_string()],
            &[100 + i as u64],
            &s,
        )
        .unwrap()[0];
        assert!(
            (again - a.best_reward).abs() < 1e-9,
            "{again} vs {}",
            a.best_reward
        );
        if a.best_reward > a.start_reward {
            improved += 1;
        }
    }
    // The tiny aesthetic reward rises under a few steps of lr 0.05 on every prompt here.
    assert_eq!(improved, 3, "adaptation did not improve every prompt");
    // Steps large enough to overshoot: the reward falls again after its best, and what is kept
    // is the best embedding, not the last (a run that kept the last would fail here).
    let wild = AdaptConfig {
        steps: 6,
        patience: 6,
        lr: LR_OVERSHOOT,
        grad_step_window: 3,
    };
    let p = "a dog running on the beach";
    let a = adapt(&mut sd, &objective, &start, p, 101, &wild, &s).unwrap();
    println!(
        "lr {LR_OVERSHOOT}: start {:.4}, steps {:?}",
        a.start_reward, a.history
    );
    let last = *a.history.last().unwrap();
    let best = a.history.iter().copied().fold(a.start_reward, f64::max);
    assert!(last < best, "no overshoot at this lr: {:?}", a.history);
    assert_eq!(a.best_reward, best);
    let again = reneg::train::step::sampled_reward(
        &mut sd,
        &objective,
        &a.embedding,
        &[p.to_string()],
        &[101],
        &s,
    )
    .unwrap()[0];
    assert!((again - best).abs() < 1e-9, "{again} vs {best}");
}
