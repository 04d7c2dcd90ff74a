//! LoRAs merged at load (issue 19) against diffusers' load_lora_weights + fuse_lora
//! (tests/fixtures/lora, written by tools/gen_lora_fixtures.py): kohya's layout at scale 0.7
//! (alpha / rank = 0.5; linear layers, 1x1 and 3x3 convolutions, the text encoder) and the
//! diffusers/PEFT layout.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff};
use reneg::lora::{parse_spec, Lora};
use reneg::Pipeline;
use std::collections::HashMap;
use std::path::Path;

const PIPE: &str = "tests/fixtures/parity/sd15-tiny/pipeline";
const FIX: &str = "tests/fixtures/lora";

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / max_abs(b)
}

fn outputs(sd: &Pipeline, latents: &Tensor) -> (Tensor, Tensor) {
    let text = sd.encode("a photo of a cat").unwrap().embeds;
    let eps = sd.unet().unwrap().forward(latents, 500.0, &text).unwrap();
    (text, eps)
}

#[test]
fn merged_loras_give_diffusers_fused_outputs_in_both_layouts() {
    let want =
        candle_core::safetensors::load(Path::new(FIX).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let latents = &want["latents"];
    let base = Pipeline::load(Path::new(PIPE), DType::F32, &Device::Cpu).unwrap();
    let (bt, be) = outputs(&base, latents);
    assert!(rel_err(&bt, &want["base_text"]) < 1e-5);
    assert!(rel_err(&be, &want["base_eps"]) < 1e-5);
    for (name, scale) in [("kohya", 0.7), ("peft", 1.0)] {
        let lora = Lora::load(&Path::new(FIX).join(format!("{name}.safetensors")), scale).unwrap();
        let sd =
            Pipeline::load_with_loras(Path::new(PIPE), DType::F32, &Device::Cpu, &[lora]).unwrap();
        let (t, e) = outputs(&sd, latents);
        let (et, ee) = (
            rel_err(&t, &want[&format!("{name}_text")]),
            rel_err(&e, &want[&format!("{name}_eps")]),
        );
        println!("{name} LoRA at {scale}: text {et:.2e}, eps {ee:.2e} (relative)");
        // Measured at most 3.9e-7 (text) and 3.4e-6 (UNet output).
        assert!(et < 1e-6 && ee < 1e-5, "{name}: {et} {ee}");
        // The LoRA changes the UNet's output (a merge that did nothing would fail above, unless
        // the fixture were degenerate: check it is not).
        assert!(rel_err(&e, &be) > 1e-2, "{name}");
    }
}

/// The error of loading the tiny SD pipeline with the LoRA in `p`.
fn refusal(p: &Path) -> String {
    let lora = Lora::load(p, 1.0).unwrap();
    Pipeline::load_with_loras(Path::new(PIPE), DType::F32, &Device::Cpu, &[lora])
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn loras_for_other_models_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("reneg-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let write = |name: &str, keys: &[(&str, Tensor)]| {
        let p = dir.join(name);
        let m: HashMap<String, Tensor> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        candle_core::safetensors::save(&m, &p).unwrap();
        p
    };
    // A module this UNet does not have (an SD1.5 LoRA of a larger model's block).
    let p = write(
        "other.safetensors",
        &[
            (
                "lora_unet_down_blocks_2_attentions_0_proj_in.lora_down.weight",
                t(&[4, 32]),
            ),
            (
                "lora_unet_down_blocks_2_attentions_0_proj_in.lora_up.weight",
                t(&[32, 4]),
            ),
        ],
    );
    let e = refusal(&p);
    assert!(
        e.contains("other.safetensors")
            && e.contains("down_blocks_2")
            && e.contains("another architecture"),
        "{e}"
    );
    // The right module with the wrong width.
    let p = write(
        "wide.safetensors",
        &[
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", t(&[4, 320])),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", t(&[320, 4])),
        ],
    );
    let e = refusal(&p);
    assert!(e.contains("wide.safetensors") && e.contains("to_q"), "{e}");
    // SDXL's second text encoder has no place in SD: refused, not left out.
    let p = write(
        "xl.safetensors",
        &[
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                t(&[4, 32]),
            ),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                t(&[37, 4]),
            ),
        ],
    );
    let e = refusal(&p);
    assert!(
        e.contains("xl.safetensors") && e.contains("lora_te2_") && e.contains("SDXL"),
        "{e}"
    );
    assert_eq!(
        parse_spec("a/b.safetensors:0.5").unwrap(),
        ("a/b.safetensors".into(), 0.5)
    );
    assert_eq!(
        parse_spec("c:/x.safetensors").unwrap(),
        ("c:/x.safetensors".into(), 1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
