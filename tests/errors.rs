//! Bad input is reported as an error that names the file, key or tensor, never a panic and
//! never a silently wrong model.

mod common;

use common::{max_abs, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::models::vae::VaeConfig;
use reneg::scheduler::SchedulerConfig;
use reneg::weights::{Vb, Weights};
use reneg::{Error, Pipeline};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SD15: &str = "tests/fixtures/parity/sd15-tiny/pipeline";

fn sd15_unet_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{SD15}/unet/config.json")).unwrap())
        .unwrap()
}

fn with(mut cfg: Value, key: &str, value: Value) -> Value {
    cfg[key] = value;
    cfg
}

fn unet_err(cfg: Value) -> String {
    let err = UNetConfig::from_value(cfg, Path::new("unet/config.json")).unwrap_err();
    assert!(matches!(err, Error::UnsupportedConfig { .. }), "{err}");
    assert!(err.is_user_error());
    err.to_string()
}

#[test]
fn unsupported_unet_config_values_are_named() {
    let base = sd15_unet_config();
    for (key, value) in [
        ("resnet_time_scale_shift", json!("scale_shift")),
        ("class_embed_type", json!("timestep")),
        ("addition_embed_type", json!("text_image")),
        ("only_cross_attention", json!(true)),
        ("time_embedding_type", json!("fourier")),
        ("conv_in_kernel", json!(5)),
        ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
        ("num_attention_heads", json!(8)),
        ("act_fn", json!("gelu")),
    ] {
        let msg = unet_err(with(base.clone(), key, value.clone()));
        assert!(msg.contains(key), "{msg}");
        assert!(
            msg.contains(&value.to_string().trim_matches('"').to_string()),
            "{msg}"
        );
        assert!(msg.contains("unet/config.json"), "{msg}");
    }
    let msg = unet_err(with(
        base.clone(),
        "down_block_types",
        json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ));
    assert!(msg.contains("SimpleCrossAttnDownBlock2D"), "{msg}");
    let msg = unet_err(with(base.clone(), "attention_head_dim", json!([8, 8, 8])));
    assert!(msg.contains("attention_head_dim"), "{msg}");
    let msg = unet_err(with(base.clone(), "norm_num_groups", json!(7)));
    assert!(msg.contains("norm_num_groups"), "{msg}");
    // Zero groups or heads: an error naming the key, not a division by zero (issue 16).
    let msg = unet_err(with(base.clone(), "norm_num_groups", json!(0)));
    assert!(msg.contains("norm_num_groups"), "{msg}");
    let msg = unet_err(with(base, "attention_head_dim", json!(0)));
    assert!(msg.contains("attention_head_dim"), "{msg}");
}

#[test]
fn supported_defaults_spelled_out_are_accepted() {
    let cfg = with(
        sd15_unet_config(),
        "only_cross_attention",
        json!([false, false]),
    );
    let cfg = with(cfg, "resnet_time_scale_shift", json!("default"));
    let cfg = with(cfg, "class_embed_type", Value::Null);
    UNetConfig::from_value(cfg, Path::new("unet/config.json")).unwrap();
}

#[test]
fn unsupported_vae_and_scheduler_values_are_named() {
    let err = VaeConfig::from_value(
        json!({"shift_factor": 0.0609}),
        Path::new("vae/config.json"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("shift_factor"), "{err}");
    let err = VaeConfig::from_value(json!({"norm_num_groups": 0}), Path::new("vae/config.json"))
        .unwrap_err();
    assert!(err.to_string().contains("norm_num_groups"), "{err}");
    let err = SchedulerConfig::from_value(
        json!({"_class_name": "FlowMatchEulerDiscreteScheduler"}),
        Path::new("scheduler_config.json"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("FlowMatchEulerDiscreteScheduler"),
        "{err}"
    );
    // A crash the fuzzer found (examples/fuzz.rs): zero training timesteps.
    let err = SchedulerConfig::from_value(json!({"num_train_timesteps": 0}), Path::new("s.json"))
        .unwrap_err();
    assert!(err.to_string().contains("num_train_timesteps"), "{err}");
    let err = SchedulerConfig::from_value(json!({"thresholding": true}), Path::new("s.json"))
        .unwrap_err();
    assert!(err.to_string().contains("thresholding"), "{err}");
    let err = SchedulerConfig::from_value(json!({"prediction_type": "flow"}), Path::new("s.json"))
        .unwrap_err();
    assert!(err.to_string().contains("s.json"), "{err}");
    // A pipeline saved with PNDM (as the original SD1.5) loads; its sampler is PNDM's PLMS.
    SchedulerConfig::from_value(json!({"_class_name": "PNDMScheduler"}), Path::new("s.json"))
        .unwrap();
}

fn unet_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        format!("{SD15}/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn build_unet(tensors: HashMap<String, Tensor>) -> reneg::Result<UNet2DConditionModel> {
    let cfg = UNetConfig::load(&PathBuf::from(format!("{SD15}/unet/config.json"))).unwrap();
    let w = Weights::from_tensors(
        tensors,
        Path::new("unet.safetensors"),
        DType::F32,
        &Device::Cpu,
    );
    UNet2DConditionModel::new(cfg, &Vb::new(w))
}

#[test]
fn missing_tensor_names_tensor_shape_and_file() {
    let mut t = unet_tensors();
    t.remove("mid_block.attentions.0.proj_in.weight").unwrap();
    let msg = build_unet(t).err().unwrap().to_string();
    assert!(
        msg.contains("mid_block.attentions.0.proj_in.weight"),
        "{msg}"
    );
    assert!(msg.contains("missing"), "{msg}");
    assert!(msg.contains("[64, 64, 1, 1]"), "{msg}");
    assert!(msg.contains("unet.safetensors"), "{msg}");
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let mut t = unet_tensors();
    t.insert(
        "conv_in.bias".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = build_unet(t).err().unwrap().to_string();
    assert!(
        msg.contains("conv_in.bias") && msg.contains("[7]") && msg.contains("[32]"),
        "{msg}"
    );
}

#[test]
fn bf16_and_f16_weights_load_into_f32() {
    // The same UNet stored in bf16 and f16 gives the f32 model's output within that rounding.
    let t = unet_tensors();
    let x = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let ctx = Tensor::ones((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let reference = build_unet(t.clone())
        .unwrap()
        .forward(&x, 500.0, &ctx)
        .unwrap();
    for (dtype, tol) in [(DType::BF16, 5e-2), (DType::F16, 5e-3)] {
        let dir = tempdir();
        let path = dir.join("w.safetensors");
        let cast: HashMap<String, Tensor> = t
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&cast, &path).unwrap();
        let w = Weights::load(&path, DType::F32, &Device::Cpu).unwrap();
        let cfg = UNetConfig::load(&PathBuf::from(format!("{SD15}/unet/config.json"))).unwrap();
        let out = UNet2DConditionModel::new(cfg, &Vb::new(w))
            .unwrap()
            .forward(&x, 500.0, &ctx)
            .unwrap();
        let err = max_abs_diff(&out, &reference) / max_abs(&reference);
        assert!(err < tol && err > 0.0, "{dtype:?}: rel err {err}");
    }
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "reneg-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn corrupt_safetensors_is_an_error_naming_the_file() {
    let dir = tempdir();
    let path = dir.join("broken.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let msg = Weights::load(&path, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("broken.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );
    let msg = Weights::load(&dir.join("absent.safetensors"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("absent.safetensors") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn pipeline_folder_errors() {
    let msg = Pipeline::load(Path::new("no/such/model"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("no/such/model") && msg.contains("not found"),
        "{msg}"
    );
    let dir = tempdir();
    let msg = Pipeline::load(&dir, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("model_index.json"), "{msg}");
}

/// A copy of a pipeline folder whose model_index.json names `class`.
fn folder_naming(from: &str, class: &str) -> PathBuf {
    let dir = tempdir().join("pipeline");
    common::copy_dir(Path::new(from), &dir);
    let index = dir.join("model_index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["_class_name"] = json!(class);
    std::fs::write(&index, v.to_string()).unwrap();
    dir
}

/// The family is recognised from model_index.json's pipeline class before any weight is
/// read: a class reneg does not run is refused by name (an SDXL folder used to fail somewhere
/// inside its text encoder), and a class whose UNet is of the other kind too.
#[test]
fn pipeline_folders_of_other_families_are_refused_by_class() {
    let load = |dir: &Path| {
        Pipeline::load(dir, DType::F32, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
    };
    let flux = folder_naming(SD15, "FluxPipeline");
    let msg = load(&flux).expect("a Flux class is refused");
    assert!(
        msg.contains("FluxPipeline")
            && msg.contains("model_index.json")
            && msg.contains("StableDiffusionPipeline, StableDiffusionControlNetPipeline")
            && msg.contains("StableDiffusionXLPipeline")
            && msg.contains("PixArtAlphaPipeline"),
        "{msg}"
    );
    // PixArt's class over an SD 1.5 folder: its CLIP text encoder is no T5.
    let pixart = folder_naming(SD15, "PixArtAlphaPipeline");
    let msg = load(&pixart).expect("a PixArt class over an SD 1.5 folder is refused");
    assert!(
        msg.contains("text_encoder/config.json") && msg.contains("T5"),
        "{msg}"
    );
    // SDXL's class over an SD 1.5 folder: refused for what the folder lacks.
    let sdxl = folder_naming(SD15, "StableDiffusionXLPipeline");
    let msg = load(&sdxl).expect("an SDXL class over an SD 1.5 folder is refused");
    assert!(msg.contains("text_encoder_2"), "{msg}");
    let video = folder_naming(SD15, "TextToVideoSDPipeline");
    let msg = load(&video).expect("a video class over an image UNet is refused");
    assert!(
        msg.contains("UNet2DConditionModel (an image model)"),
        "{msg}"
    );
    let image = folder_naming(
        "tests/fixtures/parity/text2video-ms-tiny/pipeline",
        "StableDiffusionPipeline",
    );
    let msg = load(&image).expect("an image class over a video UNet is refused");
    assert!(
        msg.contains("UNet3DConditionModel (a video model)"),
        "{msg}"
    );
    // The families reneg runs load under each of their classes.
    for class in [
        "StableDiffusionPipeline",
        "StableDiffusionControlNetPipeline",
        "StableDiffusionImg2ImgPipeline",
    ] {
        assert_eq!(load(&folder_naming(SD15, class)), None, "{class}");
    }
    // A hand-made folder that names no class: the UNet decides, as before.
    let bare = folder_naming(SD15, "x");
    std::fs::write(bare.join("model_index.json"), "{}").unwrap();
    assert_eq!(load(&bare), None);
}

/// An original single file of another family is named, not only "not SD 1.x/2.x".
#[test]
fn single_files_of_other_families_are_named() {
    let dir = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sd_xl_base_1.0.safetensors");
    let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = [
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
    ]
    .iter()
    .map(|k| (k.to_string(), t.clone()))
    .collect();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let msg = reneg::single_file::convert(&file, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("Stable Diffusion XL") && msg.contains("sd_xl_base_1.0.safetensors"),
        "{msg}"
    );
}

#[test]
fn embedding_shape_is_checked_against_the_model() {
    let sd = Pipeline::load(Path::new(SD15), DType::F32, &Device::Cpu).unwrap();
    let neg = |shape: (usize, usize, usize)| {
        reneg::embedding::NegativeEmbedding::new(
            Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap()
    };
    let file = Path::new("neg.safetensors");
    sd.negative(&neg((1, 77, 32)), file).unwrap();
    let msg = sd
        .negative(&neg((1, 77, 768)), file)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("768") && msg.contains("[1, 77, 32]") && msg.contains("neg.safetensors"),
        "{msg}"
    );
    // A part the model has no place for is refused by its name.
    let mut pooled = neg((1, 77, 32));
    pooled.pooled = Some(Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap());
    let msg = sd.negative(&pooled, file).unwrap_err().to_string();
    assert!(msg.contains("negative_pooled_prompt_embeds"), "{msg}");
}
