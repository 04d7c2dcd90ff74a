//! `--clip-skip` against diffusers' clip_skip (tests/fixtures/clip_skip, written by
//! tools/gen_clip_skip_fixture.py) and `--vae`'s swap of the decoder (issue 19).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff};
use reneg::Pipeline;
use std::path::Path;

fn model() -> Pipeline {
    Pipeline::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn clip_skip_takes_an_earlier_layer_through_the_final_norm_as_diffusers_does() {
    let case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/clip_skip/case.json").unwrap(),
    )
    .unwrap();
    let prompt = case["prompt"].as_str().unwrap();
    let want = candle_core::safetensors::load(
        "tests/fixtures/clip_skip/expected.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let mut sd = model();
    let mut outs = Vec::new();
    for k in 0..3 {
        sd.set_clip_skip(k).unwrap();
        let got = sd.encode(prompt).unwrap().embeds;
        let w = &want[&format!("skip_{k}")];
        let err = max_abs_diff(&got, w) / max_abs(w);
        println!("clip skip {k}: relative error {err:.2e}");
        // Measured at most 4.2e-7.
        assert!(err < 1e-6, "skip {k}: {err}");
        outs.push(got);
    }
    // Each skip changes the output (a skip that did nothing would pass the k = 0 check only).
    assert!(max_abs_diff(&outs[0], &outs[1]) > 1e-3);
    assert!(max_abs_diff(&outs[1], &outs[2]) > 1e-3);
    let layers = case["layers"].as_u64().unwrap() as usize;
    let e = sd.set_clip_skip(layers).unwrap_err().to_string();
    assert!(
        e.contains("--clip-skip") && e.contains(&format!("{layers} layers")),
        "{e}"
    );
}

#[test]
fn a_swapped_vae_decodes_as_its_own_pipeline_and_a_folder_without_one_is_refused() {
    let mut sd = model();
    let z = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &Device::Cpu).unwrap();
    let before = sd.decode(&z).unwrap();
    // The same folder again: the same decoder.
    sd.replace_vae(Path::new("tests/fixtures/parity/sd15-tiny/pipeline/vae"))
        .unwrap();
    assert_eq!(max_abs_diff(&sd.decode(&z).unwrap(), &before), 0.0);
    // Another pipeline's VAE with the same latent width decodes differently, and exactly as
    // that pipeline decodes.
    let other = Path::new("tests/fixtures/parity/sd2-tiny/pipeline");
    sd.replace_vae(&other.join("vae")).unwrap();
    let swapped = sd.decode(&z).unwrap();
    assert!(max_abs_diff(&swapped, &before) > 1e-3);
    let theirs = Pipeline::load(other, DType::F32, &Device::Cpu)
        .unwrap()
        .decode(&z)
        .unwrap();
    assert_eq!(max_abs_diff(&swapped, &theirs), 0.0);
    let e = sd
        .replace_vae(Path::new("tests/fixtures/parity/sd15-tiny/pipeline/unet"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unet"), "{e}");
}
