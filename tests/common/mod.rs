//! Shared test helpers: seeded random tensors, tiny random-weight models, and the
//! finite-difference gradient check.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::models::vae::{AutoencoderKL, VaeConfig};
use reneg::scheduler::SchedulerConfig;
use reneg::tokenizer::ClipTokenizer;
use reneg::weights::{Vb, Weights};
use reneg::Pipeline;
use serde_json::json;
use std::path::Path;

/// Seeded standard-normal tensor (f64), independent of candle's global RNG.
pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let mut rng = reneg::rng::SplitMix64::new(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
    );
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// max |t|, as f64.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a - b|, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    max_abs(&(a - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// The bits of an f32 tensor's elements, for comparisons that must be exact.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

pub fn random_vb(seed: u64) -> Vb {
    random_vb_dtype(seed, DType::F64)
}

/// [`random_vb`] in another dtype (the same values, rounded).
pub fn random_vb_dtype(seed: u64, dtype: DType) -> Vb {
    Vb::new(Weights::random(seed, dtype, &Device::Cpu))
}

/// A tiny SD-like UNet config (2 levels, cross-attention in the first).
pub fn tiny_unet_config(linear_projection: bool) -> UNetConfig {
    UNetConfig::from_value(
        json!({
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": [2, 4],
            "norm_num_groups": 4,
            "cross_attention_dim": 12,
            "use_linear_projection": linear_projection,
            "in_channels": 4,
            "out_channels": 4
        }),
        Path::new("<test unet config>"),
    )
    .unwrap()
}

/// A tiny ModelScope-like video UNet config (`UNet3DConditionModel`, 2 levels, cross-attention
/// in the first; `attention_head_dim` 2 is the head dimension there, transformer_in has 8 heads).
pub fn tiny_video_unet_config() -> UNetConfig {
    UNetConfig::from_value(
        json!({
            "_class_name": "UNet3DConditionModel",
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
            "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "norm_num_groups": 4,
            "cross_attention_dim": 12,
            "in_channels": 4,
            "out_channels": 4
        }),
        Path::new("<test video unet config>"),
    )
    .unwrap()
}

pub fn tiny_unet(seed: u64, linear_projection: bool) -> UNet2DConditionModel {
    UNet2DConditionModel::new(tiny_unet_config(linear_projection), &random_vb(seed)).unwrap()
}

pub fn tiny_vae(seed: u64) -> AutoencoderKL {
    let cfg = VaeConfig::from_value(
        json!({
            "block_out_channels": [8, 8],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "latent_channels": 4
        }),
        Path::new("<test vae config>"),
    )
    .unwrap();
    AutoencoderKL::new(cfg, &random_vb(seed)).unwrap()
}

/// A whole tiny random pipeline in f64 (text width 12), with the given prediction type.
pub fn tiny_pipeline(seed: u64, prediction_type: &str) -> Pipeline {
    let te_cfg = ClipTextConfig::from_value(
        json!({"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1,
               "num_attention_heads": 2, "hidden_act": "quick_gelu"}),
        Path::new("<test text config>"),
    )
    .unwrap();
    let text_encoder = ClipTextModel::new(te_cfg, &random_vb(seed + 1)).unwrap();
    let sched = SchedulerConfig::from_value(
        json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1,
               "prediction_type": prediction_type}),
        Path::new("<test scheduler config>"),
    )
    .unwrap();
    Pipeline::from_parts(
        ClipTokenizer::embedded("<|endoftext|>").unwrap(),
        text_encoder,
        tiny_unet(seed + 2, false),
        tiny_vae(seed + 3),
        sched,
        Path::new("<tiny random pipeline>"),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap()
}

/// Relative tolerance of the finite-difference check in f64. Richardson-extrapolated central
/// differences agree with a correct gradient to about 1e-8; a gradient off by 0.1% fails.
pub const FD_TOL: f64 = 1e-5;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// L(x) = sum(R * f(x)), with a fixed random R so every output element matters.
fn objective<F>(f: &F, x: &Tensor, seed: u64) -> Tensor
where
    F: Fn(&Tensor) -> Tensor,
{
    let y = f(x);
    let r = randn(seed ^ 0xABCD, y.dims()).to_dtype(y.dtype()).unwrap();
    (y * r).unwrap().sum_all().unwrap()
}

/// The analytic gradient of L at x, through candle's backward.
pub fn analytic_grad<F>(f: &F, x: &Tensor, seed: u64) -> Tensor
where
    F: Fn(&Tensor) -> Tensor,
{
    let v = Var::from_tensor(x).unwrap();
    let loss = objective(f, v.as_tensor(), seed);
    let grads = loss.backward().unwrap();
    grads
        .get(v.as_tensor())
        .cloned()
        .unwrap_or_else(|| x.zeros_like().unwrap())
}

/// The worst relative disagreement between `grad` and central finite differences of L,
/// along 3 random directions and 4 random coordinates.
pub fn fd_error<F>(f: &F, x: &Tensor, grad: &Tensor, seed: u64) -> f64
where
    F: Fn(&Tensor) -> Tensor,
{
    let h = 1e-4;
    let n = x.elem_count();
    let gmax = scalar(&grad.abs().unwrap().max_all().unwrap());
    let mut directions = vec![];
    for k in 0..3 {
        directions.push((randn(seed + 100 + k, x.dims()), 0.0));
    }
    for k in 0..4u64 {
        let idx = ((seed + k * 7919) as usize * 2_654_435_761) % n;
        let mut e = vec![0f64; n];
        e[idx] = 1.0;
        let d = Tensor::from_vec(e, x.dims(), x.device()).unwrap();
        // Coordinates with a tiny derivative are judged relative to the gradient's scale.
        directions.push((d, 1e-3 * gmax));
    }
    let mut worst: f64 = 0.0;
    for (d, floor) in directions {
        let central = |h: f64| {
            let plus = scalar(&objective(f, &(x + (&d * h).unwrap()).unwrap(), seed));
            let minus = scalar(&objective(f, &(x - (&d * h).unwrap()).unwrap(), seed));
            (plus - minus) / (2.0 * h)
        };
        // Richardson extrapolation cancels the h^2 error term of central differences.
        let fd = (4.0 * central(h / 2.0) - central(h)) / 3.0;
        let an = scalar(&(grad * &d).unwrap().sum_all().unwrap());
        let denom = fd.abs().max(an.abs()).max(floor).max(1e-12);
        worst = worst.max((fd - an).abs() / denom);
    }
    worst
}

/// Asserts that candle's backward through `f` agrees with finite differences at `x` (f64).
pub fn assert_gradient<F>(name: &str, f: F, x: &Tensor)
where
    F: Fn(&Tensor) -> Tensor,
{
    assert_eq!(x.dtype(), DType::F64, "gradient checks run in f64");
    let seed = name
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    let g = analytic_grad(&f, x, seed);
    let gmax = scalar(&g.abs().unwrap().max_all().unwrap());
    assert!(gmax > 0.0, "{name}: the gradient is identically zero");
    let err = fd_error(&f, x, &g, seed);
    println!("gradcheck {name:<40} max rel err {err:.2e}");
    assert!(
        err < FD_TOL,
        "{name}: gradient disagrees with finite differences: {err:.3e}"
    );
}

/// Case folders (those holding a `case.json`) at or below `root`, sorted.
fn find_cases(root: &Path, depth: usize, out: &mut Vec<std::path::PathBuf>) {
    if root.join("case.json").is_file() {
        out.push(root.to_path_buf());
        return;
    }
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut dirs: Vec<std::path::PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        find_cases(&d, depth - 1, out);
    }
}

/// Every parity case folder: `tests/fixtures/parity/` and each path in `RENEG_PARITY_DIRS`
/// (colon-separated).
/// The parity cases committed under tests/fixtures/parity, by folder: each must run (a case
/// that silently dropped out would leave its claims unchecked).
pub const COMMITTED_PIPELINE_CASES: [&str; 10] = [
    "controlnet-sd15-tiny",
    "controlnet-sd2-tiny",
    "sd-rescale-tiny",
    "sd-variant",
    "sd15-tiny",
    "sd2-tiny",
    "text2video-ms-tiny",
    "text2video-zs-tiny",
    "videocrafter2-tiny",
    "videocrafter2-tiny-f16",
];
pub const COMMITTED_SDXL_CASES: [&str; 4] = [
    "sdxl-tiny",
    "sdxl-tiny-empty",
    "sdxl-tiny-vpred",
    "sdxl-tiny-zeros",
];
pub const COMMITTED_PIXART_CASES: [&str; 4] = [
    "pixart-tiny",
    "pixart-tiny-1024",
    "pixart-tiny-ddim",
    "pixart-tiny-empty",
];
pub const COMMITTED_REWARD_CASES: [&str; 4] = [
    "reward-aesthetic",
    "reward-hfclip",
    "reward-openclip-gelu",
    "reward-openclip-quickgelu",
];

/// Whether `dir` is one of the committed cases (not one given through RENEG_PARITY_DIRS).
pub fn is_committed_case(dir: &Path) -> bool {
    dir.parent() == Some(Path::new("tests/fixtures/parity"))
}

/// The committed cases of `names` missing from `ran` (case folders that ran).
pub fn missing_cases(names: &[&str], ran: &[std::path::PathBuf]) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            !ran.iter()
                .any(|d| is_committed_case(d) && d.file_name().is_some_and(|f| f == **n))
        })
        .map(|n| n.to_string())
        .collect()
}

pub fn parity_case_dirs() -> Vec<std::path::PathBuf> {
    let mut roots = vec![std::path::PathBuf::from("tests/fixtures/parity")];
    if let Ok(extra) = std::env::var("RENEG_PARITY_DIRS") {
        for p in extra.split(':').filter(|p| !p.is_empty()) {
            assert!(
                Path::new(p).exists(),
                "RENEG_PARITY_DIRS names {p}, which does not exist"
            );
            roots.push(std::path::PathBuf::from(p));
        }
    }
    let mut cases = vec![];
    for r in roots {
        find_cases(&r, 4, &mut cases);
    }
    cases
}

/// For a ControlNet parity case (`"kind": "controlnet"`): adds the pipeline's ControlNet with
/// the case's `control.png`, scale and guess mode to `sd`, as StableDiffusionControlNetPipeline
/// ran it; returns the control image tensor. None for other cases.
pub fn add_case_controlnet(sd: &mut Pipeline, dir: &Path) -> Option<Tensor> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    if meta["kind"] != "controlnet" {
        return None;
    }
    let cn_dir = dir.join("pipeline/controlnet");
    let model = reneg::control::load(&cn_dir, None, sd.dtype(), sd.device())
        .unwrap_or_else(|err| panic!("{}: {err}", cn_dir.display()));
    let png = reneg::io::read_png(&dir.join("control.png")).unwrap();
    let image = reneg::control::image_tensor(&png.data, png.width, png.height, sd.device())
        .unwrap()
        .to_dtype(sd.dtype())
        .unwrap();
    let scale = meta["controlnet_conditioning_scale"]
        .as_f64()
        .unwrap_or(1.0);
    sd.set_guess_mode(meta["guess_mode"].as_bool().unwrap_or(false))
        .unwrap();
    sd.add_controlnet(model, image.clone(), scale, &cn_dir)
        .unwrap_or_else(|err| panic!("{}: {err}", cn_dir.display()));
    Some(image)
}

/// The parity case kinds a whole pipeline runs for: plain pipelines and ControlNet cases.
pub fn is_pipeline_case(dir: &Path) -> bool {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    match meta["kind"].as_str() {
        Some("videocrafter") => dir.join("model").is_dir(),
        // SDXL and PixArt cases have their own runners and tensors (tests/parity.rs).
        Some("sdxl") | Some("pixart") => false,
        None | Some("pipeline") | Some("controlnet") | Some("text2video") => {
            dir.join("pipeline").is_dir()
        }
        _ => false,
    }
}

/// A pipeline case's model as `--model` loads it: a diffusers `pipeline/` folder, or a
/// VideoCrafter case's `model/` (lvdm's checkpoint and yaml) with the case's frame rate and
/// DDIM eta (`fps`, `ddim_eta` in case.json).
pub fn load_case_pipeline(dir: &Path, dtype: DType, dev: &Device) -> Pipeline {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let lvdm = dir.join("model");
    let mut sd = if meta["kind"] == "videocrafter" {
        reneg::source::load(lvdm.to_str().unwrap(), &Default::default(), dtype, dev)
    } else {
        Pipeline::load(&dir.join("pipeline"), dtype, dev)
    }
    .unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
    if let Some(fps) = meta["fps"].as_u64() {
        assert!(
            sd.frame_rate().is_some(),
            "{}: a case with an fps whose model is not conditioned on one",
            dir.display()
        );
        sd.set_fps(fps as u32).unwrap();
    }
    if let Some(eta) = meta["ddim_eta"].as_f64() {
        sd.scheduler.set_eta(eta).unwrap();
    }
    sd
}

/// Every file under `dir`, recursively (none when `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                files_under(&e.path())
            } else {
                vec![e.path()]
            }
        })
        .collect()
}

/// Copies folder `from` to `to`, recursively (a fixture to change in a test's own folder).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}
