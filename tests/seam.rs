//! The seam, written once for every family (issue 30), driven by a family made here from the
//! roles' traits alone: a toy whose negative has a pooled embedding and an attention mask, as
//! SDXL's and PixArt's have. What no SD case can check: every learned part gets its gradient
//! through the generic guided step (finite differences), the gradient step returns it for each
//! part in both backward arrangements, training learns each floating part and leaves the mask
//! as it was, and a resumed run ends with every part bit for bit as an uninterrupted one.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_gradient, max_abs, max_abs_diff, randn};
use reneg::conditioning::{Conditioning, Shape};
use reneg::family::roles::{Branch, Decoder, Denoiser, PromptEncoder};
use reneg::reward::LinearReward;
use reneg::scheduler::SchedulerConfig;
use reneg::train::config::TrainConfig;
use reneg::train::global::{train, Prompts};
use reneg::train::step::{gradient_at, Backward, Objective, Pixels};
use reneg::Pipeline;
use serde_json::json;
use std::any::Any;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

const TOKENS: usize = 4;

/// Text to a conditioning of 4 x 3 embeddings, a pooled part 2 wide and a mask of the text's
/// tokens (the last position padding), all seeded by the text's length.
struct ToyEncoder;

fn mask(valid: usize) -> Tensor {
    let v: Vec<f64> = (0..TOKENS)
        .map(|i| f64::from(u8::from(i < valid)))
        .collect();
    Tensor::from_vec(v, (1, TOKENS), &Device::Cpu).unwrap()
}

impl PromptEncoder for ToyEncoder {
    fn encode(&self, text: &str) -> reneg::Result<Conditioning> {
        let seed = text.len() as u64 + 1;
        Ok(Conditioning {
            embeds: randn(seed, &[1, TOKENS, 3]),
            pooled: Some(randn(seed + 100, &[1, 2])),
            mask: Some(mask(TOKENS - 1)),
        })
    }
    /// As SDXL's `force_zeros_for_empty_prompt`: zeros, with the empty prompt's mask.
    fn no_negative(&self) -> reneg::Result<Conditioning> {
        Ok(Conditioning {
            embeds: Tensor::zeros((1, TOKENS, 3), DType::F64, &Device::Cpu)?,
            pooled: Some(Tensor::zeros((1, 2), DType::F64, &Device::Cpu)?),
            mask: Some(mask(1)),
        })
    }
    fn shape(&self) -> Shape {
        Shape {
            tokens: TOKENS,
            width: 3,
            pooled: Some(2),
            mask: true,
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// x / 2 plus tanh(masked mean of the embeddings W1 + pooled W2), per latent channel, scaled
/// by the timestep: every part of the conditioning reaches the output.
struct ToyDenoiser {
    w1: Tensor,
    w2: Tensor,
}

impl Denoiser for ToyDenoiser {
    fn forward(&self, x: &Tensor, t: f64, c: &Conditioning, _: Branch) -> reneg::Result<Tensor> {
        let m = c.mask.as_ref().expect("the toy's conditioning has a mask");
        let p = c
            .pooled
            .as_ref()
            .expect("the toy's conditioning has a pooled part");
        let masked = c.embeds.broadcast_mul(&m.unsqueeze(2)?)?.sum(1)?;
        let mean = masked.broadcast_div(&m.sum_keepdim(1)?)?;
        let f = (mean.matmul(&self.w1)? + p.matmul(&self.w2)?)?.tanh()?;
        let (b, ch, _, _) = x.dims4()?;
        let f = (f.reshape((b, ch, 1, 1))? * (1.0 - t / 2000.0))?;
        Ok(((x * 0.5)?.broadcast_add(&f))?)
    }
    fn latent_channels(&self) -> usize {
        2
    }
    fn is_video(&self) -> bool {
        false
    }
    fn sample_size(&self) -> Option<usize> {
        Some(2)
    }
    fn size_multiple(&self) -> usize {
        1
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Two latent channels to three pixel channels (the third their product: not linear).
struct ToyDecoder;

impl Decoder for ToyDecoder {
    fn decode(&self, z: &Tensor) -> reneg::Result<Tensor> {
        let (a, b) = (z.narrow(1, 0, 1)?, z.narrow(1, 1, 1)?);
        Ok(Tensor::cat(&[&a, &b, &(&a * &b)?], 1)?)
    }
    fn scale(&self) -> usize {
        1
    }
    fn latent_channels(&self) -> usize {
        2
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn toy() -> Pipeline {
    let sched = SchedulerConfig::from_value(
        json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1}),
        Path::new("<toy scheduler>"),
    )
    .unwrap();
    let roles: reneg::family::Roles = (
        Box::new(ToyEncoder),
        Box::new(ToyDenoiser {
            w1: randn(7, &[3, 2]),
            w2: randn(8, &[2, 2]),
        }),
        Box::new(ToyDecoder),
    );
    Pipeline::from_roles(roles, sched, Path::new("<toy>"), DType::F64, &Device::Cpu).unwrap()
}

fn objective() -> Objective {
    Objective {
        rewards: vec![(Box::new(LinearReward(randn(9, &[1, 3, 2, 2]))), 1.0)],
        pixels: Pixels::Raw,
    }
}

#[test]
fn every_learned_part_gets_the_gradient_finite_differences_give() {
    let mut sd = toy();
    sd.guidance_rescale = 0.3;
    sd.scheduler.set_timesteps(5).unwrap();
    let cond = sd.encode("a toy").unwrap();
    let neg = sd.encode("neg").unwrap();
    let latents = randn(10, &[1, 2, 2, 2]);
    let x0 = |n: &Conditioning| -> Tensor {
        let x0 = sd.predict_x0(&latents, 2, &cond, n, 7.5).unwrap();
        sd.decode(&x0).unwrap()
    };
    let with_embeds = |e: &Tensor| {
        x0(&neg
            .with_learned(&[e.clone(), neg.pooled.clone().unwrap()])
            .unwrap())
    };
    let with_pooled = |p: &Tensor| x0(&neg.with_learned(&[neg.embeds.clone(), p.clone()]).unwrap());
    assert_gradient(
        "toy guided step wrt negative_prompt_embeds",
        with_embeds,
        &neg.embeds,
    );
    assert_gradient(
        "toy guided step wrt negative_pooled_prompt_embeds",
        with_pooled,
        neg.pooled.as_ref().unwrap(),
    );

    // The gradient step returns each part's gradient, in either arrangement, as autograd of
    // the loss written out here gives it.
    let objective = objective();
    let prompts = ["a toy".to_string()];
    let (e, p) = (
        Var::from_tensor(&neg.embeds).unwrap(),
        Var::from_tensor(neg.pooled.as_ref().unwrap()).unwrap(),
    );
    let n = neg
        .with_learned(&[e.as_tensor().clone(), p.as_tensor().clone()])
        .unwrap();
    let images = x0(&n);
    let loss = objective
        .score_decoded(&images, &prompts)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let g = loss.backward().unwrap();
    let want = [g.get(e.as_tensor()).unwrap(), g.get(p.as_tensor()).unwrap()];
    for backward in [Backward::Staged, Backward::OnePass] {
        let r = gradient_at(
            &sd,
            &objective,
            &neg,
            &prompts,
            &cond,
            &latents,
            2,
            (7.5, backward, 1.0),
        )
        .unwrap();
        assert_eq!(
            r.grad.len(),
            2,
            "two learned parts; the mask is not learned"
        );
        for (got, want) in r.grad.iter().zip(&want) {
            let scale = max_abs(want);
            assert!(scale > 0.0);
            let d = max_abs_diff(got, want) / scale;
            assert!(d < 1e-12, "{backward:?}: {d:e}");
        }
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-seam-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(out: &Path) -> TrainConfig {
    let text = format!(
        r#"
model = "<toy>"
prompts = "unused.txt"
out = "{}"
batch_size = 2
micro_batch_size = 1
sampling_steps = 4
grad_step_window = 2
height = 2
width = 2
lr = 0.05
steps = 4
val_every = 0
checkpoint_every = 1
[[rewards]]
kind = "aesthetic"
model = "unused"
"#,
        out.display()
    );
    let src = Path::new("seam.toml");
    let table = TrainConfig::from_toml(&text, src).unwrap();
    TrainConfig::resolve(table, TrainConfig::from_toml("", src).unwrap(), src).unwrap()
}

/// Trains from the toy's `no_negative`, stopping after `stop_after` when given.
fn run(out: &Path, resume: bool, stop_after: Option<u64>) -> Conditioning {
    let mut sd = toy();
    let init = sd.no_negative().unwrap();
    let prompts = ["a toy".to_string(), "another toy".to_string()];
    train(
        &config(out),
        &mut sd,
        &objective(),
        Prompts {
            train: &prompts,
            val: &[],
        },
        init,
        resume,
        |m, _| match stop_after == Some(m.step) {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        },
    )
    .unwrap()
    .embedding
}

#[test]
fn training_learns_every_floating_part_keeps_the_mask_and_resumes_bit_for_bit() {
    let init = toy().no_negative().unwrap();
    let out = tmp("resumed");
    // AdamW's first step moves every element its gradient reaches by the learning rate
    // (m / sqrt(v) = sign(g)): so after one step each learned part has moved by 0.05 where
    // the mask lets the gradient in, and not at all where it does not (the empty prompt's
    // mask keeps only the first token).
    let first = run(&out, false, Some(0));
    let moved = |a: &Tensor, b: &Tensor| -> Vec<f64> {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        (f64(a) - f64(b))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let embeds = moved(&first.embeds, &init.embeds);
    for (i, d) in embeds.iter().enumerate() {
        let want = if i < 3 { 0.05 } else { 0.0 };
        assert!((d - want).abs() < 1e-6, "embeds element {i} moved {d}");
    }
    let pooled = moved(
        first.pooled.as_ref().unwrap(),
        init.pooled.as_ref().unwrap(),
    );
    assert!(pooled.iter().all(|d| (d - 0.05).abs() < 1e-6), "{pooled:?}");
    let (m0, m1) = (init.mask.as_ref().unwrap(), first.mask.as_ref().unwrap());
    assert_eq!(max_abs_diff(m1, m0), 0.0, "the mask stays fixed");

    let resumed = run(&out, true, None);
    let whole = run(&tmp("whole"), false, None);
    assert_eq!(resumed.parts().len(), 3);
    for ((part, a), (_, b)) in whole.parts().iter().zip(resumed.parts().iter()) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{part:?} differs after a resume");
    }
    let p1 = whole.pooled.as_ref().unwrap();

    // The files hold every part under diffusers' names.
    let saved =
        reneg::embedding::NegativeEmbedding::load(&out.join("embedding.safetensors")).unwrap();
    let names: Vec<&str> = saved.parts().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "negative_prompt_attention_mask"
        ]
    );
    let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    assert_eq!(
        max_abs_diff(&as_f32(saved.pooled.as_ref().unwrap()), &as_f32(p1)),
        0.0
    );
}

#[test]
fn ranks_exchange_a_gradient_for_every_part() {
    use reneg::train::distributed::{sum_in_order, Collective, Contribution, FileGroup, World};
    let dir = tmp("exchange");
    let part = |i: usize, k: usize| Tensor::full((i * 10 + k) as f32, (1, k + 1), &Device::Cpu);
    let got: Vec<Vec<Contribution>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let dir = dir.clone();
                s.spawn(move || {
                    let world = World {
                        rank,
                        world_size: 2,
                        local_rank: rank,
                    };
                    let mut g = FileGroup::new(&dir, world, 2, &Device::Cpu).unwrap();
                    let mine = Contribution {
                        index: rank,
                        grad: vec![part(rank, 0).unwrap(), part(rank, 1).unwrap()],
                        loss: rank as f64,
                        rewards: vec![],
                    };
                    g.gather(0, vec![mine]).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for all in &got {
        let (sum, _, _) = sum_in_order(all).unwrap();
        assert_eq!(sum.len(), 2, "both parts arrive");
        // Part k of rank i is filled with 10 i + k: the sums are 10 + 2k.
        for (k, t) in sum.iter().enumerate() {
            assert_eq!(t.dims(), &[1, k + 1]);
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|&x| x == (10 + 2 * k) as f32),
                "part {k}: {v:?}"
            );
        }
    }
}

/// The guidance branches batched or apart (side by side on two threads, as small latents run
/// by default) give the same predictions and the same gradient, A1111's longer prompts (the
/// negative padded with the empty prompt's chunk) included.
#[test]
fn the_guidance_branches_agree_batched_or_apart() {
    use reneg::pipeline::BranchMode;
    use reneg::prompt_syntax::PromptSyntax;
    let mut sd = common::tiny_pipeline(70, "epsilon");
    sd.set_prompt_syntax(PromptSyntax::A1111).unwrap();
    sd.scheduler.set_timesteps(5).unwrap();
    let x = randn(71, &[2, 4, 4, 4]);
    let long = sd.encode("a cat BREAK a dog").unwrap();
    let cond = sd.batch(&[&long, &long]).unwrap();
    assert_eq!(cond.embeds.dim(1).unwrap(), 154, "two chunks");
    let uncond = Conditioning::from(randn(72, &[1, 77, 12]))
        .repeat(2)
        .unwrap();
    let mut eps = vec![];
    let mut grads = vec![];
    for mode in [BranchMode::Batched, BranchMode::Apart] {
        sd.branch_mode = mode;
        eps.push(sd.guided_eps(&x, 401.0, &cond, &uncond, 7.5).unwrap());
        let objective = objective_for(&sd);
        let r = gradient_at(
            &sd,
            &objective,
            &uncond.narrow(0, 1).unwrap(),
            &["a".into(), "b".into()],
            &cond,
            &x,
            2,
            (7.5, Backward::Staged, 1.0),
        )
        .unwrap();
        grads.push(r.grad[0].clone());
    }
    let d = max_abs_diff(&eps[0], &eps[1]);
    assert!(d < 1e-12, "predictions differ by {d:e}");
    let g = max_abs_diff(&grads[0], &grads[1]);
    assert!(g < 1e-12, "gradients differ by {g:e}");
}

/// A linear reward over the tiny pipeline's decoded pixels.
fn objective_for(sd: &Pipeline) -> Objective {
    let x0 = randn(73, &[1, 4, 4, 4]);
    let pixels = sd.decode(&x0).unwrap();
    Objective {
        rewards: vec![(Box::new(LinearReward(randn(74, pixels.dims()))), 1.0)],
        pixels: Pixels::Raw,
    }
}

/// An option the family has no place for (the toy has no textual inversions, clip skip,
/// ControlNets or replaceable VAE) is refused with the model named, never ignored.
#[test]
fn options_a_family_lacks_are_refused_naming_the_model() {
    let mut sd = toy();
    let errors = [
        sd.set_clip_skip(1).unwrap_err().to_string(),
        sd.set_guess_mode(true).unwrap_err().to_string(),
        sd.replace_vae(Path::new("some-vae"))
            .unwrap_err()
            .to_string(),
    ];
    for (e, what) in errors.iter().zip(["clip skip", "guess mode", "VAE"]) {
        assert!(
            e.starts_with("<toy>: ") && e.contains(what) && e.contains("model family"),
            "{e}"
        );
    }
    // What every family has is no refusal.
    sd.set_guess_mode(false).unwrap();
    sd.set_prompt_syntax(reneg::prompt_syntax::PromptSyntax::Plain)
        .unwrap();
}
