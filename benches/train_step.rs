//! The ReNeg training step, timed: `cargo bench --bench train_step -- CASE` with CASE one of
//! `tiny` (the sd15-tiny parity pipeline and the tiny aesthetic reward: a whole step, 10
//! sampling steps, gradient at the last), `full16` / `full32` / `full64` (SD1.5's UNet and VAE with random
//! weights at 16x16 / 32x32 latents: one guided no-grad UNet evaluation, i.e. a sampling step,
//! and the gradient step of `train::step::gradient_at`: the staged backward through decode
//! and a linear reward, then the negative branch of the UNet). Prints one JSON line; peak RSS is the process's VmHWM,
//! so run one case per process (tools/bench.sh does, beside tools/bench_reference.py).

use candle_core::{DType, Device, Tensor, Var};
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::reward::LinearReward;
use reneg::scheduler::{DdimConfig, DdimScheduler};
use reneg::tokenizer::ClipTokenizer;
use reneg::train::step::{gradient_at, reneg_gradient, Objective, Pixels, Sampling};
use reneg::weights::{Vb, Weights};
use reneg::StableDiffusion;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Median of `reps` timings of `f` after one warm-up.
fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let c = Instant::now();
            f();
            c.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn tiny() {
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let reward = reneg::reward::load::load_aesthetic(
        Path::new("tests/fixtures/parity/reward-aesthetic/reward"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let objective = Objective::new(vec![(Box::new(reward), 1.0)]);
    let emb = sd.encode_prompt("").unwrap();
    let s = Sampling {
        steps: 10,
        guidance_scale: 7.5,
        height: 32,
        width: 32,
    };
    let prompts = ["a red cube on a table".to_string()];
    let secs = time(5, || {
        reneg_gradient(&mut sd, &objective, &emb, &prompts, &[1], 9, &s).unwrap();
    });
    println!(
        "{}",
        json!({"impl": "reneg", "case": "tiny", "step_s": secs, "peak_rss_mb": peak_rss_mb()})
    );
}

const SD15_UNET: &str = r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
  "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
const SD15_VAE: &str = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215}"#;

fn full(latent: usize) {
    let dev = Device::Cpu;
    let p = Path::new("<bench config>");
    let vb = |seed| Vb::new(Weights::random(seed, DType::F32, &dev));
    let unet = UNet2DConditionModel::new(
        UNetConfig::from_value(serde_json::from_str(SD15_UNET).unwrap(), p).unwrap(),
        &vb(1),
    )
    .unwrap();
    let vae = AutoencoderKL::new(
        VaeConfig::from_value(serde_json::from_str(SD15_VAE).unwrap(), p).unwrap(),
        &vb(2),
    )
    .unwrap();
    // The text encoder is not on the timed path; a one-layer one keeps set-up cheap.
    let te = ClipTextModel::new(
        ClipTextConfig::from_value(json!({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 1, "num_attention_heads": 12}), p).unwrap(),
        &vb(3),
    )
    .unwrap();
    let sched = DdimScheduler::new(
        DdimConfig::from_value(
            json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1}),
            p,
        )
        .unwrap(),
    );
    let sd = StableDiffusion::from_parts(
        ClipTokenizer::embedded("<|endoftext|>").unwrap(),
        te,
        unet,
        vae,
        sched,
        p,
        DType::F32,
        &dev,
    )
    .unwrap();
    let cond = reneg::rng::randn(10, &[1, 77, 768], DType::F32, &dev).unwrap();
    let neg = reneg::rng::randn(11, &[1, 77, 768], DType::F32, &dev).unwrap();
    let x = reneg::rng::randn(12, &[1, 4, latent, latent], DType::F32, &dev).unwrap();
    let w = reneg::rng::randn(13, &[1, 3, latent * 8, latent * 8], DType::F32, &dev).unwrap();
    let sample_s = time(2, || {
        sd.guided_eps(&x, 501, &cond, &neg, 7.5).unwrap();
    });
    let rss_after_sampling = peak_rss_mb();
    let objective = Objective {
        rewards: vec![(Box::new(LinearReward(w)), 1.0)],
        pixels: Pixels::Raw,
    };
    let grad_s = time(1, || {
        gradient_at(&sd, &objective, &neg, &[String::new()], &cond, &x, 201, 7.5).unwrap();
    });
    if std::env::var_os("RENEG_BENCH_PHASES").is_some() {
        phases(&sd, &x, &neg, &objective);
    }
    println!(
        "{}",
        json!({"impl": "reneg", "case": format!("full{latent}"), "sample_eval_s": sample_s, "grad_step_s": grad_s,
               "peak_rss_sampling_mb": rss_after_sampling, "peak_rss_mb": peak_rss_mb()})
    );
}

/// The gradient step's phases one by one (`RENEG_BENCH_PHASES=1`), for the profile in
/// BENCHMARKS.md: printed to stderr, one line each.
fn phases(sd: &StableDiffusion, x: &Tensor, neg: &Tensor, objective: &Objective) {
    let lap =
        |name: &str, c: Instant| eprintln!("phase {name}: {:.3} s", c.elapsed().as_secs_f64());
    let c = Instant::now();
    let u0 = sd.unet.forward(x, 201.0, neg).unwrap();
    lap("unet forward, no graph", c);
    let x0 = Var::from_tensor(&u0).unwrap();
    let c = Instant::now();
    let images = sd.decode(x0.as_tensor()).unwrap();
    lap("vae decode, graph", c);
    let c = Instant::now();
    let loss = objective
        .score(&images, &[String::new()])
        .unwrap()
        .sum_all()
        .unwrap();
    lap("reward", c);
    let c = Instant::now();
    let g = loss.backward().unwrap();
    lap("decode + reward backward", c);
    drop((g, images, loss));
    let var = Var::from_tensor(neg).unwrap();
    let c = Instant::now();
    let u = sd.unet.forward(x, 201.0, var.as_tensor()).unwrap();
    lap("unet forward, graph", c);
    let c = Instant::now();
    let g = u.sum_all().unwrap().backward().unwrap();
    lap("unet backward", c);
    drop(g);
}

fn main() {
    let case = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "tiny".into());
    match case.as_str() {
        "tiny" => tiny(),
        "full16" => full(16),
        "full32" => full(32),
        "full64" => full(64),
        other => eprintln!("unknown case {other}: tiny, full16, full32 or full64"),
    }
}
