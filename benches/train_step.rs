//! The ReNeg training step, timed: `cargo bench --bench train_step -- CASE` with CASE one of
//! `tiny` (the sd15-tiny parity pipeline and the tiny aesthetic reward: a whole step, 10
//! sampling steps, gradient at the last), `full16` / `full32` / `full64` (SD1.5's UNet and VAE with random
//! weights at 16x16 / 32x32 latents: one guided no-grad UNet evaluation, i.e. a sampling step,
//! and the gradient step of `train::step::gradient_at`: the staged backward through decode
//! and a linear reward, then the negative branch of the UNet). Prints one JSON line; peak RSS is the process's VmHWM,
//! so run one case per process (tools/bench.sh does, beside tools/bench_reference.py).
//!
//! `sdxl32` is SDXL base's UNet (random weights, 2.6 B parameters) and the VAE at 32x32 latents,
//! batch 1, the same two timings with SDXL's conditioning (embeddings and pooled, both in the
//! gradient) and guidance 5.
//!
//! `pixart32` is PixArt-α 512's transformer (random weights, 611 M parameters) and the VAE at
//! 32x32 latents, batch 1, guidance 4.5, captions [1, 120, 4096] with masks keeping 20 rows
//! (prompt) and 1 (negative, the mask of "").
//!
//! `conv` times the CPU 3x3 convolution kernels (`nn::cpu_conv`) alone, im2col + gemm against
//! Winograd F(4x4, 3x3), forward and input gradient, over the SD UNet's and decoder's shapes
//! and smaller ones: the measurement behind `Algo::Auto`'s choice. One JSON line per shape.
//!
//! A `full` case takes a batch size as `fullNxB` (`full64x4`: 512 px, 4 images; `fullN` is batch 1):
//! the sampling evaluation is then the UNet on 2B latents and the gradient step is for B prompts.
//! `RENEG_BENCH_BACKWARD=one-pass` takes the gradient step in one pass (`train::step::Backward`;
//! staged by default). `RENEG_BENCH_DEVICE=cuda` (a build with `--features cuda`) runs the case on the first CUDA
//! device and `RENEG_BENCH_PRECISION=f32|tf32|bf16|fp16` sets the precision (`reneg::precision`;
//! f32 by default; `RENEG_BENCH_DTYPE` is its older name), `RENEG_BENCH_CHECKPOINTING=1` turns on
//! activation checkpointing of the gradient step. Each line has `impl`, `precision`, `batch`,
//! `sample_eval_s`, `grad_step_s`, `train_step_s`, `peak_mem_mib` (device peak on a GPU, peak
//! RSS on the CPU), `commit` (`RENEG_COMMIT`, else git's) and `device`. On a GPU
//! each timing synchronizes the device, the repetitions are `RENEG_BENCH_REPS` (default 5 for a
//! sampling evaluation, 3 for a gradient step), and `peak_gpu_mb` is the largest device-wide
//! memory in use (total - free, sampled every 2 ms by a second thread, CUDA context included),
//! `base_gpu_mb` the same before the weights were made.
//!
//! For profiles: `RENEG_BENCH_SAMPLING_ONLY=1` stops a `full` case after the sampling
//! evaluation, `RENEG_BENCH_PHASES=1` prints the gradient step's phases, and
//! `RENEG_BENCH_OUTSIDE_POOL=1` / `RENEG_BENCH_RETURN_MEMORY=1` undo the binary's run-time
//! settings (`reneg::runtime`) for A/B runs, and `RENEG_BENCH_UNPACKED=1` keeps frozen linear
//! weights unpacked (`nn::cpu_packed`).

use candle_core::{Device, Tensor, Var};
use reneg::conditioning::Conditioning;
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::precision::Precision;
use reneg::reward::LinearReward;
use reneg::scheduler::SchedulerConfig;
use reneg::tokenizer::ClipTokenizer;
use reneg::train::step::{gradient_at, reneg_gradient, Backward, Objective, Pixels, Sampling};
use reneg::weights::{Vb, Weights};
use reneg::Pipeline;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
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

/// Median of `reps` timings of `f` after one warm-up; the device is synchronized before each
/// clock reading (a no-op on the CPU).
fn time<F: FnMut()>(dev: &Device, reps: usize, mut f: F) -> f64 {
    f();
    dev.synchronize().unwrap();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let c = Instant::now();
            f();
            dev.synchronize().unwrap();
            c.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The device of `RENEG_BENCH_DEVICE` (`cpu`, the default, or `cuda` / `cuda:N`).
fn bench_device() -> Device {
    match std::env::var("RENEG_BENCH_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(d) if d.starts_with("cuda") => {
            let ordinal = d
                .strip_prefix("cuda:")
                .map(|n| n.parse().expect("RENEG_BENCH_DEVICE=cuda:N"))
                .unwrap_or(0);
            Device::new_cuda(ordinal).unwrap_or_else(|e| {
                panic!("RENEG_BENCH_DEVICE={d}: {e} (build with --features cuda)")
            })
        }
        Ok(d) => panic!("RENEG_BENCH_DEVICE={d}: expected cpu, cuda or cuda:N"),
    }
}

/// The precision of `RENEG_BENCH_PRECISION` (`f32`, the default, `tf32`, `bf16`, `fp16`;
/// `RENEG_BENCH_DTYPE` is the older name, with `f16` for fp16), applied to the device.
fn bench_precision(dev: &Device) -> Precision {
    let var =
        std::env::var("RENEG_BENCH_PRECISION").or_else(|_| std::env::var("RENEG_BENCH_DTYPE"));
    let p = match var.as_deref() {
        Err(_) | Ok("") | Ok("f32") => Precision::F32,
        Ok("tf32") => Precision::Tf32,
        Ok("bf16") => Precision::Bf16,
        Ok("fp16") | Ok("f16") => Precision::Fp16,
        Ok(d) => panic!("RENEG_BENCH_PRECISION={d}: expected f32, tf32, bf16 or fp16"),
    };
    p.apply(dev);
    p
}

/// `RENEG_BENCH_CHECKPOINTING=1` checkpoints the UNet's layers and the decoder's blocks on the
/// gradient step.
fn bench_checkpointing() -> bool {
    matches!(
        std::env::var("RENEG_BENCH_CHECKPOINTING").as_deref(),
        Ok("1") | Ok("on")
    )
}

/// The commit measured: `RENEG_COMMIT` (tools/gpu_check.sh sets it; the device machine's copy
/// of the tree has no .git), else `git rev-parse --short HEAD`.
fn commit() -> String {
    std::env::var("RENEG_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        })
}

/// `RENEG_BENCH_BACKWARD=one-pass` times the one-pass gradient step (default: staged).
fn bench_backward() -> Backward {
    match std::env::var("RENEG_BENCH_BACKWARD").as_deref() {
        Ok("one-pass") => Backward::OnePass,
        Ok("staged") | Err(_) => Backward::Staged,
        Ok(other) => panic!("RENEG_BENCH_BACKWARD={other}: staged or one-pass"),
    }
}

fn reps(default: usize) -> usize {
    std::env::var("RENEG_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Device-wide GPU memory in use (bytes), sampled by a second thread: `peak()` is the largest
/// reading since the last `reset()`. Does nothing on the CPU.
struct GpuMemory {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    base: usize,
}

impl GpuMemory {
    #[cfg(feature = "cuda")]
    fn start(dev: &Device) -> Self {
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut base = 0;
        if let Device::Cuda(d) = dev {
            let ctx = d.cuda_stream().context().clone();
            let used = move || {
                ctx.mem_get_info()
                    .map(|(free, total)| total - free)
                    .unwrap_or(0)
            };
            base = used();
            let (p, s) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.fetch_max(used(), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
        }
        Self { peak, stop, base }
    }

    #[cfg(not(feature = "cuda"))]
    fn start(_: &Device) -> Self {
        Self {
            peak: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(true)),
            base: 0,
        }
    }

    fn mb(bytes: usize) -> f64 {
        bytes as f64 / (1024.0 * 1024.0)
    }

    /// The peak in MiB since the last reset (after a pause long enough for a sample).
    fn peak_mb(&self) -> f64 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        Self::mb(self.peak.load(Ordering::Relaxed))
    }

    fn reset(&self) {
        std::thread::sleep(std::time::Duration::from_millis(10));
        self.peak.store(0, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `RENEG_BENCH_BRANCHES=batched|apart` fixes how the guidance branches run (A/B of
/// `Pipeline::branch_mode`; unset: its default).
fn set_branch_mode(sd: &mut Pipeline) {
    use reneg::pipeline::BranchMode;
    sd.branch_mode = match std::env::var("RENEG_BENCH_BRANCHES").as_deref() {
        Ok("batched") => BranchMode::Batched,
        Ok("apart") => BranchMode::Apart,
        _ => BranchMode::Auto,
    };
}

fn tiny() {
    let dev = bench_device();
    let precision = bench_precision(&dev);
    let dtype = precision.weight_dtype();
    let mut sd = Pipeline::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        dtype,
        &dev,
    )
    .unwrap();
    set_branch_mode(&mut sd);
    let reward = reneg::reward::load::load_aesthetic(
        Path::new("tests/fixtures/parity/reward-aesthetic/reward"),
        dtype,
        &dev,
    )
    .unwrap();
    let objective = Objective::new(vec![(Box::new(reward), 1.0)]);
    let emb = sd.encode("").unwrap();
    let s = Sampling {
        steps: 10,
        guidance_scale: 7.5,
        height: 32,
        width: 32,
        frames: None,
        backward: bench_backward(),
        loss_scale: 1.0,
    };
    let prompts = ["a red cube on a table".to_string()];
    let secs = time(&dev, reps(5), || {
        reneg_gradient(&mut sd, &objective, &emb, &prompts, &[1], 9, &s).unwrap();
    });
    println!(
        "{}",
        json!({"impl": "reneg", "case": "tiny", "step_s": secs, "peak_rss_mb": peak_rss_mb(),
               "backward": format!("{:?}", bench_backward()), "precision": precision.name(),
               "commit": commit(),
               "device": format!("{:?}", dev.location()), "dtype": format!("{dtype:?}")})
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

/// SDXL base 1.0's UNet config (diffusers' `unet/config.json`).
const SDXL_UNET: &str = r#"{"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
  "cross_attention_dim": 2048, "use_linear_projection": true, "addition_embed_type": "text_time",
  "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
  "sample_size": 128, "norm_num_groups": 32}"#;

/// A prompt encoder of a given shape that is never asked to encode (the benches' conditioning
/// is random): it lets SDXL's pipeline be built without its two text encoders.
struct ShapeOnly(reneg::conditioning::Shape);

impl reneg::family::roles::PromptEncoder for ShapeOnly {
    fn encode(&self, _: &str) -> reneg::Result<Conditioning> {
        Err(reneg::Error::Invalid("the bench encodes no text".into()))
    }
    fn shape(&self) -> reneg::conditioning::Shape {
        self.0
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The DDIM schedule of SD (and SDXL) that the gradient step is taken on.
fn sd_schedule(p: &Path) -> SchedulerConfig {
    SchedulerConfig::from_value(
        json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1}),
        p,
    )
    .unwrap()
}

/// A `full` case: SD1.5's UNet and VAE with random weights.
fn full(latent: usize, batch: usize) {
    let dev = bench_device();
    let precision = bench_precision(&dev);
    let dtype = precision.weight_dtype();
    let mem = GpuMemory::start(&dev);
    let p = Path::new("<bench config>");
    let vb = |seed| Vb::new(Weights::random(seed, dtype, &dev));
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
    let sd = Pipeline::from_parts(
        ClipTokenizer::embedded("<|endoftext|>").unwrap(),
        te,
        unet,
        vae,
        sd_schedule(p),
        p,
        dtype,
        &dev,
    )
    .unwrap();
    let case = if batch == 1 {
        format!("full{latent}")
    } else {
        format!("full{latent}x{batch}")
    };
    measure(
        sd,
        &case,
        latent,
        batch,
        Text::clip(768, None),
        7.5,
        (precision, &mem),
    );
}

/// `sdxl32`: SDXL base's UNet (2.6 B parameters) and the VAE with random weights at 32x32
/// latents, batch 1, guidance 5 (diffusers' SDXL default): the negative is both parts, the
/// size ids the image's (256, 256, 0, 0, 256, 256).
fn sdxl(latent: usize) {
    use reneg::family::roles::SizeConditioning;
    use reneg::family::sd::VaeDecoder;
    use reneg::family::sdxl::SdxlDenoiser;
    let dev = bench_device();
    let precision = bench_precision(&dev);
    let dtype = precision.weight_dtype();
    let mem = GpuMemory::start(&dev);
    let p = Path::new("<bench config>");
    let vb = |seed| Vb::new(Weights::random(seed, dtype, &dev));
    let unet = UNet2DConditionModel::new(
        UNetConfig::from_value(serde_json::from_str(SDXL_UNET).unwrap(), p).unwrap(),
        &vb(1),
    )
    .unwrap();
    let mut vae_cfg: serde_json::Value = serde_json::from_str(SD15_VAE).unwrap();
    vae_cfg["scaling_factor"] = json!(0.13025);
    let vae = AutoencoderKL::new(VaeConfig::from_value(vae_cfg, p).unwrap(), &vb(2)).unwrap();
    let shape = reneg::conditioning::Shape {
        tokens: 77,
        width: 2048,
        pooled: Some(1280),
        mask: false,
    };
    let denoiser = SdxlDenoiser {
        unet,
        sizes: SizeConditioning::default(),
        vae_scale: 8,
    };
    let roles: reneg::family::Roles = (
        Box::new(ShapeOnly(shape)),
        Box::new(denoiser),
        Box::new(VaeDecoder::new(vae, dtype, &dev)),
    );
    let sd = Pipeline::from_roles(roles, sd_schedule(p), p, dtype, &dev).unwrap();
    measure(
        sd,
        &format!("sdxl{latent}"),
        latent,
        1,
        Text::clip(2048, Some(1280)),
        5.0,
        (precision, &mem),
    );
}

/// A case's text side: tokens and width of the embeddings, the pooled width (SDXL), and
/// (PixArt) how many rows the prompt's and the negative's attention masks keep.
struct Text {
    tokens: usize,
    width: usize,
    pooled: Option<usize>,
    mask: Option<(usize, usize)>,
}

impl Text {
    fn clip(width: usize, pooled: Option<usize>) -> Self {
        Self {
            tokens: 77,
            width,
            pooled,
            mask: None,
        }
    }
}

/// PixArt-XL-2-512x512's transformer config (diffusers' `PixArtTransformer2DModel`, 611 M
/// parameters).
const PIXART_512: &str = r#"{"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
    "out_channels": 8, "num_layers": 28, "sample_size": 64, "patch_size": 2, "caption_channels": 4096,
    "cross_attention_dim": 1152, "norm_type": "ada_norm_single", "norm_eps": 1e-6,
    "attention_bias": true, "num_embeds_ada_norm": 1000}"#;

/// `pixart32`: PixArt-α 512's transformer and the VAE with random weights at 32x32 latents,
/// batch 1, guidance 4.5 (its pipeline's default): T5-sized captions [1, 120, 4096], the
/// prompt's mask keeping 20 rows, the negative's 1 (the mask of "").
fn pixart(latent: usize) {
    use reneg::family::pixart::PixArtDenoiser;
    use reneg::family::sd::VaeDecoder;
    use reneg::models::pixart::{PixArtConfig, PixArtTransformer2DModel};
    let dev = bench_device();
    let precision = bench_precision(&dev);
    let dtype = precision.weight_dtype();
    let mem = GpuMemory::start(&dev);
    let p = Path::new("<bench config>");
    let vb = |seed| Vb::new(Weights::random(seed, dtype, &dev));
    let cfg: PixArtConfig = serde_json::from_str(PIXART_512).unwrap();
    let transformer = PixArtTransformer2DModel::new(cfg, &vb(1)).unwrap();
    let vae = AutoencoderKL::new(
        VaeConfig::from_value(serde_json::from_str(SD15_VAE).unwrap(), p).unwrap(),
        &vb(2),
    )
    .unwrap();
    let shape = reneg::conditioning::Shape {
        tokens: 120,
        width: 4096,
        pooled: None,
        mask: true,
    };
    let roles: reneg::family::Roles = (
        Box::new(ShapeOnly(shape)),
        Box::new(PixArtDenoiser {
            transformer,
            vae_scale: 8,
        }),
        Box::new(VaeDecoder::new(vae, dtype, &dev)),
    );
    let sd = Pipeline::from_roles(roles, sd_schedule(p), p, dtype, &dev).unwrap();
    let text = Text {
        tokens: 120,
        width: 4096,
        pooled: None,
        mask: Some((20, 1)),
    };
    measure(
        sd,
        &format!("pixart{latent}"),
        latent,
        1,
        text,
        4.5,
        (precision, &mem),
    );
}

/// Times a pipeline's sampling evaluation and gradient step on random conditioning of
/// `text`'s shape at `latent`x`latent`, and prints the case's JSON line.
fn measure(
    sd: Pipeline,
    case: &str,
    latent: usize,
    b: usize,
    text: Text,
    guidance: f64,
    (precision, mem): (Precision, &GpuMemory),
) {
    let Text {
        tokens,
        width,
        pooled,
        mask,
    } = text;
    let dev = sd.device().clone();
    let dtype = precision.weight_dtype();
    let gpu = dev.is_cuda();
    let mut sd = sd;
    set_branch_mode(&mut sd);
    sd.set_checkpointing(bench_checkpointing());
    // The gradient step at timestep 201, as the PyTorch reference takes it: DDIM's step 3
    // of 5 (leading spacing, offset 1).
    sd.scheduler.set_timesteps(5).unwrap();
    let grad_step = 3;
    assert_eq!(sd.scheduler.timestep(grad_step).unwrap(), 201.0);
    let sd = sd;
    // Between models everything is in the activation dtype (f32 under bf16/fp16 autocast).
    let act = sd.dtype();
    let cond = reneg::rng::randn(10, &[b, tokens, width], act, &dev).unwrap();
    let neg = reneg::rng::randn(11, &[1, tokens, width], act, &dev).unwrap();
    // A mask keeping the first `keep` rows of each of `n` sequences.
    let mask_of = |keep: usize, n: usize| {
        let row: Vec<f32> = (0..tokens)
            .map(|i| if i < keep { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(row, (1, tokens), &dev)
            .unwrap()
            .to_dtype(act)
            .unwrap()
            .repeat((n, 1))
            .unwrap()
    };
    let (cond_mask, neg_mask) = match mask {
        Some((c, n)) => (Some(mask_of(c, b)), Some(mask_of(n, 1))),
        None => (None, None),
    };
    let pooled_of = |seed, n| pooled.map(|p| reneg::rng::randn(seed, &[n, p], act, &dev).unwrap());
    let (cond_pooled, neg_pooled) = (pooled_of(14, b), pooled_of(15, 1));
    let negs = neg
        .broadcast_as((b, tokens, width))
        .unwrap()
        .contiguous()
        .unwrap();
    let conditioning =
        |embeds: Tensor, pooled: Option<Tensor>, mask: Option<Tensor>| Conditioning {
            embeds,
            pooled,
            mask,
        };
    let negs_pooled = neg_pooled.as_ref().map(|t| {
        t.broadcast_as((b, t.dim(1).unwrap()))
            .unwrap()
            .contiguous()
            .unwrap()
    });
    let negs_mask = neg_mask.as_ref().map(|m| m.repeat((b, 1)).unwrap());
    let (cond_c, neg_c, negs_c) = (
        conditioning(cond.clone(), cond_pooled, cond_mask),
        conditioning(neg.clone(), neg_pooled, neg_mask),
        conditioning(negs.clone(), negs_pooled, negs_mask),
    );
    let x = reneg::rng::randn(12, &[b, 4, latent, latent], act, &dev).unwrap();
    let w = reneg::rng::randn(13, &[b, 3, latent * 8, latent * 8], act, &dev).unwrap();
    dev.synchronize().unwrap();
    let weights_gpu_mb = mem.peak_mb();
    mem.reset();
    // A step of a sampling run: the text's keys and values were projected at its first step
    // (nn::context); the second figure is a step that projects them, as every diffusers step.
    let sample_reps = reps(if gpu { 5 } else { 2 });
    let sample_s = time(&dev, sample_reps, || {
        sd.guided_eps(&x, 501.0, &cond_c, &negs_c, guidance)
            .unwrap();
    });
    let sample_fresh_s = time(&dev, sample_reps, || {
        reneg::nn::context::forget_all();
        sd.guided_eps(&x, 501.0, &cond_c, &negs_c, guidance)
            .unwrap();
    });
    let rss_after_sampling = peak_rss_mb();
    if std::env::var_os("RENEG_BENCH_SAMPLING_ONLY").is_some() {
        // For profiles of the sampling evaluation alone.
        println!(
            "{}",
            json!({"impl": "reneg", "case": case, "sample_eval_s": sample_s,
                   "sample_eval_fresh_s": sample_fresh_s, "peak_rss_mb": rss_after_sampling,
                   "context_lookups_reuses": reneg::nn::context::counts()})
        );
        return;
    }
    let gpu_sampling_mb = mem.peak_mb();
    mem.reset();
    let objective = Objective {
        rewards: vec![(Box::new(LinearReward(w)), 1.0)],
        pixels: Pixels::Raw,
    };
    let prompts = vec![String::new(); b];
    let backward = bench_backward();
    let grad_s = time(&dev, reps(if gpu { 3 } else { 1 }), || {
        gradient_at(
            &sd,
            &objective,
            &neg_c,
            &prompts,
            &cond_c,
            &x,
            grad_step,
            (guidance, backward, 1.0),
        )
        .unwrap();
    });
    let gpu_grad_mb = mem.peak_mb();
    if std::env::var_os("RENEG_BENCH_PHASES").is_some() && pooled.is_none() && mask.is_none() {
        phases(&sd, &x, &negs, &objective);
    }
    let mut out = json!({"impl": "reneg", "case": case, "batch": b, "sample_eval_s": sample_s,
           "sample_eval_fresh_s": sample_fresh_s, "grad_step_s": grad_s,
           // The paper's step: 30 DDIM steps, the gradient at one of the last 10 (24.5 sampling
           // evaluations before it on average).
           "train_step_s": 24.5 * sample_s + grad_s,
           "peak_rss_sampling_mb": rss_after_sampling, "peak_rss_mb": peak_rss_mb(),
           "backward": format!("{backward:?}"),
           "precision": precision.name(), "checkpointing": bench_checkpointing(),
           "commit": commit(),
           "device": format!("{:?}", dev.location()), "dtype": format!("{dtype:?}")});
    out["peak_mem_mib"] = json!(peak_rss_mb());
    if gpu {
        out["base_gpu_mb"] = json!(GpuMemory::mb(mem.base));
        out["weights_gpu_mb"] = json!(weights_gpu_mb);
        out["peak_gpu_sampling_mb"] = json!(gpu_sampling_mb);
        out["peak_gpu_grad_mb"] = json!(gpu_grad_mb);
        out["peak_gpu_mb"] = json!(weights_gpu_mb.max(gpu_sampling_mb).max(gpu_grad_mb));
        out["peak_mem_mib"] = out["peak_gpu_mb"].clone();
    }
    println!("{out}");
}

/// The gradient step's phases one by one (`RENEG_BENCH_PHASES=1`), for the profile in
/// BENCHMARKS.md: printed to stderr, one line each.
fn phases(sd: &Pipeline, x: &Tensor, neg: &Tensor, objective: &Objective) {
    let dev = x.device().clone();
    let lap = |name: &str, c: Instant| {
        dev.synchronize().unwrap();
        eprintln!("phase {name}: {:.3} s", c.elapsed().as_secs_f64())
    };
    let c = Instant::now();
    let u0 = sd.unet().unwrap().forward(x, 201.0, neg).unwrap();
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
    let u = sd
        .unet()
        .unwrap()
        .forward(x, 201.0, var.as_tensor())
        .unwrap();
    lap("unet forward, graph", c);
    let c = Instant::now();
    let g = u.sum_all().unwrap().backward().unwrap();
    lap("unet backward", c);
    drop(g);
}

/// One 3x3, padding-1 convolution per shape `(c_in, c_out, side)`, by both algorithms.
fn conv() {
    use reneg::nn::cpu_conv::{self, Algo};
    let shapes = [
        (16, 16, 32),
        (16, 16, 64),
        (32, 32, 16),
        (32, 32, 32),
        (32, 32, 64),
        (64, 64, 32),
        (64, 64, 64),
        (128, 128, 32),
        (128, 128, 256),
        (256, 256, 128),
        (320, 320, 32),
        (320, 320, 64),
        (512, 512, 16),
        (512, 512, 32),
        (512, 256, 32),
        (512, 512, 64),
        (512, 512, 128),
        (640, 640, 16),
        (640, 640, 32),
        (1280, 1280, 8),
        (1280, 1280, 16),
    ];
    let dev = Device::Cpu;
    for (ci, co, side) in shapes {
        let x = Tensor::randn(0f32, 1., (1, ci, side, side), &dev).unwrap();
        let k = Tensor::randn(0f32, 0.05, (co, ci, 3, 3), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1., (1, co, side, side), &dev).unwrap();
        let budget = 4 << 20;
        let reps = if ci * co * side * side > 1 << 30 {
            2
        } else {
            5
        };
        let fwd = |a| {
            time(&dev, reps, || {
                drop(cpu_conv::forward_algo(&x, &k, None, 1, 1, budget, a).unwrap())
            })
        };
        let bwd = |a| {
            time(&dev, reps, || {
                drop(cpu_conv::input_grad_algo(&dy, &k, 1, 1, (side, side), budget, a).unwrap())
            })
        };
        let (fi, fw) = (fwd(Algo::Im2col), fwd(Algo::Winograd));
        let (bi, bw) = (bwd(Algo::Im2col), bwd(Algo::Winograd));
        let auto = cpu_conv::auto_picks_winograd((1, ci, side, side), (co, ci, 3, 3), 1, 1);
        println!(
            "{}",
            json!({"case": "conv", "c_in": ci, "c_out": co, "side": side, "auto": if auto { "winograd" } else { "im2col" },
                "fwd_im2col_s": fi, "fwd_winograd_s": fw, "bwd_im2col_s": bi, "bwd_winograd_s": bw,
                "fwd_speedup": fi / fw, "bwd_speedup": bi / bw})
        );
    }
}

fn main() {
    // As the `reneg` binary does; RENEG_BENCH_RETURN_MEMORY=1 leaves glibc's default (A/B).
    if std::env::var("RENEG_BENCH_RETURN_MEMORY").as_deref() != Ok("1") {
        assert!(reneg::runtime::keep_freed_memory() || !cfg!(target_env = "gnu"));
    }
    reneg::runtime::fix_thread_count();
    let case = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "tiny".into());
    // fullN or fullNxB, N in 16, 32, 64.
    let full_case = case.strip_prefix("full").and_then(|rest| {
        let (n, b) = rest.split_once('x').unwrap_or((rest, "1"));
        let (n, b) = (n.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
        ([16, 32, 64].contains(&n) && b > 0).then_some((n, b))
    });
    // RENEG_BENCH_UNPACKED=1: frozen linear weights stay tensors that gemm packs per call (A/B).
    if std::env::var("RENEG_BENCH_UNPACKED").as_deref() == Ok("1") {
        reneg::nn::cpu_packed::disable();
    }
    let run = move || {
        match (case.as_str(), full_case) {
        ("tiny", _) => tiny(),
        ("conv", _) => conv(),
        ("sdxl32", _) => sdxl(32),
        ("pixart32", _) => pixart(32),
        (_, Some((n, b))) => full(n, b),
        (other, None) => eprintln!(
            "unknown case {other}: tiny, conv, full16, full32, full64, fullNxB for batch B (full64x4), sdxl32 or pixart32"
        ),
    }
    };
    // As the `reneg` binary does; RENEG_BENCH_OUTSIDE_POOL=1 runs on the main thread (A/B).
    if std::env::var("RENEG_BENCH_OUTSIDE_POOL").as_deref() == Ok("1") {
        run()
    } else {
        reneg::runtime::run_on_workers(run)
    }
}
