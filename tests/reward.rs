//! Reward models: finite-difference gradient checks of each vision tower and of the
//! preprocessing, the preprocessing against torchvision, the real LAION aesthetic head against
//! PyTorch, and bad input. (Tower parity: the reward cases of tests/parity.rs.)

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use reneg::models::clip_vision::{ClipVisionConfig, VisionTower};
use reneg::nn::Activation;
use reneg::reward::aesthetic::AestheticHead;
use reneg::reward::preprocess::Preprocess;
use serde_json::json;
use std::path::Path;

#[test]
fn vision_towers_gradient() {
    let cfg = ClipVisionConfig::from_value(
        json!({"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 8, "patch_size": 4, "projection_dim": 6}),
        Path::new("<test>"),
    )
    .unwrap();
    let vb = random_vb(60);
    let hf = VisionTower::new(
        &cfg,
        &vb.pp("vision_model"),
        Some(&vb.pp("visual_projection")),
    )
    .unwrap();
    let x = randn(61, &[1, 3, 8, 8]);
    assert_gradient(
        "transformers vision tower wrt pixels",
        |p| hf.forward(p).unwrap(),
        &x,
    );
    for (act, name) in [
        (Activation::Gelu, "gelu"),
        (Activation::QuickGelu, "quick_gelu"),
    ] {
        let oc =
            VisionTower::from_open_clip(8, 2, 2, 16, 4, 8, 6, act, &random_vb(62).pp("visual"))
                .unwrap();
        assert_gradient(
            &format!("open_clip vision tower ({name}) wrt pixels"),
            |p| oc.forward(p).unwrap(),
            &x,
        );
    }
}

#[test]
fn preprocessing_gradient() {
    for (shape, size) in [([1, 3, 10, 14], 8), ([1, 3, 12, 9], 8), ([2, 3, 5, 6], 8)] {
        let pre = Preprocess::clip(size);
        assert_gradient(
            &format!("preprocess {shape:?} -> {size}"),
            |x| pre.forward(x).unwrap(),
            &randn(63, &shape),
        );
    }
}

#[test]
fn preprocessing_matches_torchvision_and_measures_pil() {
    let fx = candle_core::safetensors::load(
        "tests/fixtures/reward/preprocess.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/reward/preprocess.json").unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for i in 0..10 {
        let Some(input) = fx.get(&format!("input_{i}")) else {
            continue;
        };
        let want = &fx[&format!("norm_{i}")];
        let size = want.dim(2).unwrap();
        let pre = Preprocess::clip(size);
        let got = pre.forward(input).unwrap();
        let err = max_abs_diff(&got, want);
        println!(
            "preprocess case {i}: {:?} -> {size}: max abs err vs torchvision {err:.2e}",
            input.dims()
        );
        assert!(err < 1e-4, "case {i}: {err}");
        // The PIL (uint8) path of the real processors differs by quantisation only.
        if let Some(pil) = fx.get(&format!("pil_{i}")) {
            let d = max_abs_diff(&pre.forward(input).unwrap(), pil);
            println!("preprocess case {i}: max abs difference to the PIL path {d:.3e}");
        }
        checked += 1;
    }
    assert!(checked >= 3, "fixture has {checked} cases");
    let _ = meta;
}

#[test]
fn real_aesthetic_head_matches_pytorch() {
    let fx = candle_core::safetensors::load(
        "tests/fixtures/reward/aesthetic_head_expected.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let head = AestheticHead::laion(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(head.input_dim(), 768);
    let out = head.forward(&fx["inputs"]).unwrap();
    let want = &fx["outputs"];
    let err = max_abs_diff(&out, want);
    let scale = max_abs(want);
    assert!(err / scale < 1e-5, "rel err {}", err / scale);
}

#[test]
fn bad_reward_inputs_are_clear_errors() {
    use reneg::reward::load::{self, RewardKind};
    let dev = Device::Cpu;
    let r = load::load(
        RewardKind::Hps,
        Path::new("tests/fixtures/parity/reward-openclip-gelu/reward"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let two_channel = Tensor::zeros((1, 2, 32, 32), DType::F32, &dev).unwrap();
    let err = r
        .score(&two_channel, &["x".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("3"), "{err}");
    let img = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev).unwrap();
    let err = r.score(&img, &["only one".into()]).unwrap_err().to_string();
    assert!(err.contains("1 prompt(s) for 2 image(s)"), "{err}");
    // A checkpoint of another layout names the right --reward.
    let err = load::load(
        RewardKind::Hps,
        Path::new("tests/fixtures/parity/reward-hfclip/reward"),
        DType::F32,
        &dev,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("pickscore"), "{err}");
    let err = load::load(
        RewardKind::Pickscore,
        Path::new("tests/fixtures/parity/reward-openclip-gelu/reward"),
        DType::F32,
        &dev,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("--reward hps"), "{err}");
    let err = load::load(
        RewardKind::Aesthetic,
        Path::new("no/such/reward"),
        DType::F32,
        &dev,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn hps_style_pytorch_state_dict_reads_like_the_safetensors() {
    use reneg::reward::load::read_state_dict;
    let dir = Path::new("tests/fixtures/parity/reward-openclip-gelu/reward");
    let pt = read_state_dict(&dir.join("open_clip_model.pt")).unwrap();
    let st = read_state_dict(&dir.join("open_clip_model.safetensors")).unwrap();
    assert_eq!(pt.len(), st.len());
    for (k, v) in &st {
        let p = pt
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the .pt"));
        let d = max_abs_diff(p, v);
        assert_eq!(d, 0.0, "{k}");
    }
}

/// Temporal consistency: the mean cosine of consecutive frames' (normalised) embeddings.
#[test]
fn temporal_consistency_is_the_mean_consecutive_cosine() {
    use candle_core::{Device, Tensor};
    let f =
        |rows: &[[f32; 2]]| Tensor::from_vec(rows.concat(), (rows.len(), 2), &Device::Cpu).unwrap();
    let tc = reneg::reward::temporal_consistency;
    // Pairs (0, 1): cosine 0; (1, 2): cosine 1; (2, 3): cosine -1 -> mean 0; frame order
    // matters (first and last compared only through their neighbours).
    assert_eq!(
        tc(&f(&[[1., 0.], [0., 1.], [0., 1.], [0., -1.]])).unwrap(),
        0.0
    );
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let v = tc(&f(&[[1., 0.], [s, s], [0., 1.]])).unwrap();
    assert!((v - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{v}");
    assert_eq!(tc(&f(&[[0.6, 0.8]])).unwrap(), 1.0);
}
