//! The official SD1.5 ReNeg embedding [1, 77, 768] through a ControlNet (issue 18): a tiny
//! SD1.5-layout pipeline and ControlNet widened to CLIP ViT-L's 768, as a diffusers folder and
//! as an original-layout single file. (The SD2.1 embedding in a video model: tests/video.rs.)

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

#[path = "../../../tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::weights::{Vb, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const CN15: &str = repo!("tests/fixtures/parity/controlnet-sd15-tiny");
const SINGLE: &str =
    repo!("tests/fixtures/single_file_controlnet/controlnet-sd15-tiny-controlnet.safetensors");
const SD15_EMB: &str = repo!("../shared/data/reneg-official/sd1.5_reneg_emb.bin");
const WIDTH: usize = 768;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-official-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn set_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

/// Replaces each cross-attention key/value projection (`attn2.to_k`, `attn2.to_v`) of a
/// safetensors file by a seeded random one reading `WIDTH`-wide text, N(0, 1/WIDTH).
fn widen_cross_attention(file: &Path) {
    let mut tensors = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let keys: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with("attn2.to_k.weight") || k.ends_with("attn2.to_v.weight"))
        .cloned()
        .collect();
    assert!(!keys.is_empty(), "{}: no cross-attention", file.display());
    for (i, k) in keys.iter().enumerate() {
        let t = &tensors[k];
        let rows = t.dim(0).unwrap();
        let w =
            reneg::rng::randn(100 + i as u64, &[rows, WIDTH], DType::F32, &Device::Cpu).unwrap();
        let w = (w / (WIDTH as f64).sqrt())
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        tensors.insert(k.clone(), w);
    }
    candle_core::safetensors::save(&tensors, file).unwrap();
}

/// The ControlNet case's pipeline and ControlNet with a 768-wide text encoder (one layer, the
/// real vocabulary; random weights) and cross-attention to match.
fn wide_controlnet_case() -> PathBuf {
    let root = tempdir("case");
    common::copy_dir(Path::new(CN15), &root);
    let p = root.join("pipeline");
    let te_cfg = p.join("text_encoder/config.json");
    for (k, v) in [
        ("hidden_size", WIDTH),
        ("projection_dim", WIDTH),
        ("num_attention_heads", 12),
        ("num_hidden_layers", 1),
        ("intermediate_size", 64),
    ] {
        set_json(&te_cfg, k, v.into());
    }
    let vb = Vb::new(Weights::trainable(1, DType::F32, &Device::Cpu));
    ClipTextModel::new(ClipTextConfig::load(&te_cfg).unwrap(), &vb).unwrap();
    let tensors: HashMap<String, Tensor> = vb
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, p.join("text_encoder/model.safetensors")).unwrap();
    for part in ["unet", "controlnet"] {
        set_json(
            &p.join(part).join("config.json"),
            "cross_attention_dim",
            WIDTH.into(),
        );
        widen_cross_attention(&p.join(part).join("diffusion_pytorch_model.safetensors"));
    }
    let single = root.join("controlnet-sd15-768.safetensors");
    std::fs::copy(SINGLE, &single).unwrap();
    widen_cross_attention(&single);
    root
}

fn generate(case: &Path, controlnet: &Path, out: &Path, negative: Option<&str>) -> Vec<u8> {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        case.join("pipeline").display().to_string(),
        "--controlnet".into(),
        controlnet.display().to_string(),
        "--control-image".into(),
        case.join("control.png").display().to_string(),
        "--prompt".into(),
        "a cat on a chair".into(),
        "--steps".into(),
        "3".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    if controlnet.is_file() {
        // The original layout does not tell this tiny ControlNet's head count.
        args.extend([
            "--controlnet-config".into(),
            case.join("pipeline/controlnet").display().to_string(),
        ]);
    }
    if let Some(e) = negative {
        args.extend(["--negative-embedding".into(), e.to_string()]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    reneg::io::read_png(&out.join("00000-seed0.png"))
        .unwrap()
        .data
}

/// What the library's guidance makes of the official embedding as the negative, through the
/// ControlNet folder: the pixels `generate` must write (the library's guidance through a
/// ControlNet matches diffusers on the parity cases, with the negative in both networks'
/// unconditional half; the file's values match PyTorch's in tests/embedding.rs). What this
/// checks is the command's own path: the file loaded and placed as the negative, unaltered.
fn library_image(case: &Path) -> Vec<u8> {
    let (dev, dtype) = (Device::Cpu, DType::F32);
    let mut sd = reneg::Pipeline::load(&case.join("pipeline"), dtype, &dev).unwrap();
    let cn = reneg::control::load(&case.join("pipeline/controlnet"), None, dtype, &dev).unwrap();
    let rgb = reneg::io::read_png(&case.join("control.png")).unwrap();
    let image =
        reneg::control::image_tensor(&rgb.data, rgb.width as usize, rgb.height as usize, &dev)
            .unwrap();
    sd.add_controlnet(cn, image, 1.0, &case.join("pipeline/controlnet"))
        .unwrap();
    let official = reneg::embedding::NegativeEmbedding::load(Path::new(SD15_EMB)).unwrap();
    let cond = sd.encode("a cat on a chair").unwrap();
    let shape = [
        vec![1],
        sd.latent_shape(rgb.height as usize, rgb.width as usize, None)
            .unwrap(),
    ]
    .concat();
    let noise = reneg::rng::randn(0, &shape, dtype, &dev).unwrap();
    let latents = sd
        .sample(
            noise,
            3,
            &cond,
            &official.tensor.clone().into(),
            7.5,
            &[0],
            |_, _| {},
        )
        .unwrap();
    let pixels = sd.decode(&latents).unwrap();
    reneg::io::Rgb::from_pixels(&pixels.get(0).unwrap())
        .unwrap()
        .data
}

#[test]
fn official_sd15_embedding_through_a_controlnet_folder_and_single_file() {
    let case = wide_controlnet_case();
    let folder = case.join("pipeline/controlnet");
    let single = case.join("controlnet-sd15-768.safetensors");
    for (tag, cn) in [("folder", &folder), ("single", &single)] {
        let null = generate(&case, cn, &case.join(format!("{tag}-null")), None);
        let official = generate(
            &case,
            cn,
            &case.join(format!("{tag}-official")),
            Some(SD15_EMB),
        );
        assert_ne!(
            null, official,
            "{tag}: the official embedding changes the image"
        );
        if tag == "folder" {
            // The image is the official embedding used as the negative (not merely some
            // change): a negative misread, left out of the ControlNet or used as the prompt
            // would give other pixels.
            let want = library_image(&case);
            let worst = official
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let differ = official.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!("generate vs the library's guidance: {differ} of {} values differ, by at most {worst}", want.len());
            assert_eq!(official.len(), want.len());
            assert!(worst <= 1, "generate's image is off by {worst} levels");
        }
    }
}
