//! Original single-file checkpoints (written from the parity pipelines by
//! `tools/gen_single_file.py`, verified there with diffusers' `from_single_file`) load and
//! give exactly the folder's images.

mod common;

use common::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use reneg::single_file::{self, Base, Overrides};
use reneg::Pipeline;
use std::path::{Path, PathBuf};

fn case(name: &str) -> PathBuf {
    PathBuf::from("tests/fixtures/parity").join(name)
}

fn image(sd: &mut Pipeline, case_dir: &Path) -> Tensor {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case_dir.join("case.json")).unwrap())
            .unwrap();
    let exp = candle_core::safetensors::load(case_dir.join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    let cond = sd.encode(meta["prompt"].as_str().unwrap()).unwrap();
    let uncond = sd
        .encode(meta["negative_prompt"].as_str().unwrap())
        .unwrap();
    let steps = meta["num_inference_steps"].as_u64().unwrap() as usize;
    let g = meta["guidance_scale"].as_f64().unwrap();
    let latents = sd
        .sample(
            exp["init_latents"].clone(),
            steps,
            &cond,
            &uncond,
            g,
            &[0],
            |_, _| {},
        )
        .unwrap();
    sd.decode(&latents).unwrap()
}

fn assert_same_image(single: &mut Pipeline, folder: &mut Pipeline, dir: &Path) {
    let a = image(single, dir);
    let b = image(folder, dir);
    let diff = max_abs_diff(&a, &b);
    assert_eq!(
        diff,
        0.0,
        "{}: single-file image differs by {diff}",
        dir.display()
    );
}

#[test]
fn sd15_single_file_with_inferred_architecture_matches_the_folder() {
    let dir = case("sd15-tiny");
    let file = dir.join("single_file.safetensors");
    let c = single_file::convert(&file, &Overrides::default()).unwrap();
    assert_eq!(c.base, Base::Sd1);
    // The inferred configs agree with the folder's on everything the tensors determine.
    let folder_unet: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("pipeline/unet/config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "use_linear_projection",
    ] {
        assert_eq!(c.unet_config[key], folder_unet[key], "{key}");
    }
    // Tiny text encoder: 4 heads cannot be inferred (SD1 has 64-wide heads), so take the
    // folder's config; the rest (UNet, VAE, tokenizer) is inferred.
    let cfg = std::env::temp_dir().join(format!("reneg-sf-{}", std::process::id()));
    std::fs::create_dir_all(cfg.join("text_encoder")).unwrap();
    std::fs::copy(
        dir.join("pipeline/text_encoder/config.json"),
        cfg.join("text_encoder/config.json"),
    )
    .unwrap();
    let ov = Overrides {
        config_dir: Some(cfg),
        prediction_type: None,
    };
    let mut single = single_file::load(&file, &ov, DType::F32, &Device::Cpu).unwrap();
    let mut folder = Pipeline::load(&dir.join("pipeline"), DType::F32, &Device::Cpu).unwrap();
    assert_same_image(&mut single, &mut folder, &dir);
}

#[test]
fn sd2_single_file_with_config_folder_matches_the_folder() {
    let dir = case("sd2-tiny");
    let file = dir.join("single_file.safetensors");
    let ov = Overrides {
        config_dir: Some(dir.join("pipeline")),
        prediction_type: None,
    };
    let c = single_file::convert(&file, &ov).unwrap();
    assert_eq!(c.base, Base::Sd2);
    // The file has one more OpenCLIP block than SD2 uses (penultimate layer).
    assert!(c
        .text_encoder
        .keys()
        .all(|k| !k.starts_with("encoder.layers.3.")));
    let mut single = single_file::load(&file, &ov, DType::F32, &Device::Cpu).unwrap();
    let mut folder = Pipeline::load(&dir.join("pipeline"), DType::F32, &Device::Cpu).unwrap();
    assert_same_image(&mut single, &mut folder, &dir);
}

#[test]
fn non_sd_files_are_refused_by_name() {
    let err = single_file::convert(
        Path::new("tests/fixtures/embedding/torch_saved.safetensors"),
        &Overrides::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("torch_saved.safetensors") && err.contains("not an original Stable Diffusion"),
        "{err}"
    );
}

/// Original-layout ControlNets (`tools/gen_single_file_controlnet.py`, checked there against
/// diffusers' own converter) convert to exactly the diffusers folder's tensors, from
/// safetensors with `control_model.` keys and from a pickled `.pth` without the prefix, and
/// the config inferred from the tensors has the folder's structure.
#[test]
fn single_file_controlnets_convert_to_the_diffusers_folders_tensors() {
    for case in ["controlnet-sd15-tiny", "controlnet-sd2-tiny"] {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parity")
            .join(case)
            .join("pipeline/controlnet");
        let want = candle_core::safetensors::load(
            folder.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let want_cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        for ext in ["safetensors", "pth"] {
            let file = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/single_file_controlnet")
                .join(format!("{case}-controlnet.{ext}"));
            let bytes = std::fs::read(&file).unwrap();
            let raw = if ext == "pth" {
                reneg::torch_file::read_state_dict(&bytes, &file).unwrap()
            } else {
                candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap()
            };
            let (got, cfg) = reneg::single_file::convert_controlnet(&raw, &file).unwrap();
            let mut a: Vec<&String> = got.keys().collect();
            let mut b: Vec<&String> = want.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{case}.{ext}: key sets differ");
            for (k, t) in &want {
                let g = &got[k];
                if ext == "safetensors" {
                    // (The pickle reader gives f32; values are compared below.)
                    assert_eq!(g.dtype(), t.dtype(), "{case}.{ext}: {k}");
                }
                let diff = (g.to_dtype(DType::F64).unwrap() - t.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{case}.{ext}: {k}");
            }
            for key in [
                "block_out_channels",
                "down_block_types",
                "cross_attention_dim",
                "conditioning_embedding_out_channels",
                "conditioning_channels",
                "in_channels",
            ] {
                assert_eq!(cfg[key], want_cfg[key], "{case}.{ext}: inferred {key}");
            }
            let layers = cfg["layers_per_block"].as_u64().unwrap();
            assert_eq!(
                Some(layers),
                want_cfg["layers_per_block"].as_u64(),
                "{case}.{ext}"
            );
        }
    }
}

/// An original SDXL single file (`tools/gen_single_file.py`: the inverse of diffusers'
/// conversion, checked there with `from_single_file`) loads, with the folder's configs, to
/// exactly the folder's image; the config inferred from its tensors alone has SDXL's
/// structure: per-level transformer depth, `text_time` from `label_emb`, both encoders.
#[test]
fn sdxl_single_file_matches_the_folder_and_its_structure_is_inferred() {
    let dir = case("sdxl-tiny");
    let file = dir.join("single_file.safetensors");
    let ov = Overrides {
        config_dir: Some(dir.join("pipeline")),
        prediction_type: None,
    };
    let mut single = single_file::load(&file, &ov, DType::F32, &Device::Cpu).unwrap();
    let mut folder = Pipeline::load(&dir.join("pipeline"), DType::F32, &Device::Cpu).unwrap();
    assert_same_image(&mut single, &mut folder, &dir);
    let all = reneg::model_file::read(&file).unwrap();
    let c = single_file::convert_sdxl(&all, &file, &Overrides::default()).unwrap();
    let u = &c.unet_config;
    assert_eq!(
        u["transformer_layers_per_block"],
        serde_json::json!([1, 1, 2])
    );
    assert_eq!(u["addition_embed_type"], "text_time");
    assert_eq!(u["projection_class_embeddings_input_dim"], 72);
    assert_eq!(u["down_block_types"][0], "DownBlock2D");
    assert_eq!(c.text_config_2["projection_dim"], 24);
    assert_eq!(
        c.text_config_2["num_hidden_layers"], 3,
        "every bigG block is kept"
    );
    assert_eq!(c.vae_config["scaling_factor"], 0.13025);
}

/// A kohya LoRA naming every UNet module of `file` (an original single file) as the original
/// UNet does (`lora_unet_input_blocks_4_1_..._to_q`, as kohya writes SDXL LoRAs), rank 2 with
/// seeded values, and a copy of `file` with each delta already added to its weight: the
/// single-file converter (checked against diffusers' own) is then the reference of where each
/// original name lands among diffusers' names.
fn original_names_lora(file: &Path, out: &Path) -> (PathBuf, PathBuf) {
    let mut all = reneg::model_file::read(file).unwrap();
    let mut lora: Vec<(String, Tensor)> = Vec::new();
    let mut keys: Vec<String> = all.keys().cloned().collect();
    keys.sort();
    for (i, key) in keys.iter().enumerate() {
        let Some(module) = key
            .strip_prefix("model.diffusion_model.")
            .and_then(|k| k.strip_suffix(".weight"))
        else {
            continue;
        };
        let w = all[key].to_dtype(DType::F32).unwrap();
        if w.rank() < 2 {
            continue; // norms: LoRAs do not adapt them
        }
        let dims = w.dims().to_vec();
        let (r, out_dim) = (2, dims[0]);
        let mut down_shape = dims.clone();
        down_shape[0] = r;
        let mut up_shape = vec![out_dim, r];
        up_shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let scale = |t: Tensor| (t * 0.05).unwrap().to_dtype(DType::F32).unwrap();
        let down = scale(common::randn(2 * i as u64, &down_shape));
        let up = scale(common::randn(2 * i as u64 + 1, &up_shape));
        let delta = up
            .flatten_from(1)
            .unwrap()
            .matmul(&down.flatten_from(1).unwrap())
            .unwrap()
            .reshape(dims.as_slice())
            .unwrap();
        all.insert(key.clone(), (w + delta).unwrap());
        let name = format!("lora_unet_{}", module.replace('.', "_"));
        lora.push((format!("{name}.lora_down.weight"), down));
        lora.push((format!("{name}.lora_up.weight"), up));
    }
    assert!(
        lora.len() > 40,
        "the file has few UNet modules: {}",
        lora.len()
    );
    std::fs::create_dir_all(out).unwrap();
    let (lora_file, merged) = (out.join("lora.safetensors"), out.join("merged.safetensors"));
    candle_core::safetensors::save(&lora.into_iter().collect(), &lora_file).unwrap();
    candle_core::safetensors::save(&all, &merged).unwrap();
    (lora_file, merged)
}

/// kohya's SDXL LoRAs name UNet modules as the original UNet does; merged into the folder
/// and into the single file they give exactly the image of the single file whose weights had
/// the deltas added before conversion. SD 1.5's tiny model covers an up block without
/// attention whose upsampler is the original's `.1.` (SDXL's are `.2.`).
#[test]
fn kohya_original_unet_names_land_where_the_single_file_converter_puts_them() {
    use reneg::lora::Lora;
    for name in ["sdxl-tiny", "sd15-tiny"] {
        let dir = case(name);
        let file = dir.join("single_file.safetensors");
        let tmp =
            std::env::temp_dir().join(format!("reneg-sgm-lora-{name}-{}", std::process::id()));
        let (lora_file, merged) = original_names_lora(&file, &tmp);
        let ov = Overrides {
            config_dir: Some(dir.join("pipeline")),
            prediction_type: None,
        };
        let lora = || vec![Lora::load(&lora_file, 1.0).unwrap()];
        let mut reference = single_file::load(&merged, &ov, DType::F32, &Device::Cpu).unwrap();
        let mut single =
            single_file::load_with_loras(&file, &ov, DType::F32, &Device::Cpu, &lora()).unwrap();
        let mut folder =
            Pipeline::load_with_loras(&dir.join("pipeline"), DType::F32, &Device::Cpu, &lora())
                .unwrap();
        let plain = image(
            &mut single_file::load(&file, &ov, DType::F32, &Device::Cpu).unwrap(),
            &dir,
        );
        let want = image(&mut reference, &dir);
        assert!(
            max_abs_diff(&plain, &want) > 1e-3,
            "{name}: the LoRA's deltas do not change the image"
        );
        for (what, sd) in [("single file", &mut single), ("folder", &mut folder)] {
            let d = max_abs_diff(&image(sd, &dir), &want);
            assert!(d < 1e-5, "{name} {what} + LoRA differs by {d}");
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
