//! SDXL's textual inversions (`clip_l`/`clip_g`), LoRAs (kohya's `lora_te1_`/`lora_te2_` and
//! original-UNet names; diffusers/PEFT's `unet.`/`text_encoder.`/`text_encoder_2.`), clip skip
//! and A1111's prompt syntax over both encoders, against `tests/fixtures/sdxl_extras/`
//! (`tools/gen_sdxl_extras_fixtures.py`: diffusers' own `load_textual_inversion`,
//! `load_lora_weights` + `fuse_lora` and `encode_prompt(clip_skip=...)`; A1111's procedure
//! written out over transformers' encoders) on the sdxl-tiny parity pipeline.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use reneg::conditioning::Conditioning;
use reneg::embedding::textual_inversion::TextualInversion;
use reneg::family::roles::Branch;
use reneg::lora::Lora;
use reneg::prompt_syntax::PromptSyntax;
use reneg::Pipeline;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const PIPE: &str = "tests/fixtures/parity/sdxl-tiny/pipeline";
const FIX: &str = "tests/fixtures/sdxl_extras";

fn fixture() -> (serde_json::Value, HashMap<String, Tensor>) {
    let case =
        serde_json::from_str(&std::fs::read_to_string(Path::new(FIX).join("case.json")).unwrap())
            .unwrap();
    let exp =
        candle_core::safetensors::load(Path::new(FIX).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    (case, exp)
}

fn file(name: &str) -> PathBuf {
    Path::new(FIX).join(name)
}

fn load(loras: &[Lora]) -> Pipeline {
    Pipeline::load_with_loras(Path::new(PIPE), DType::F32, &Device::Cpu, loras).unwrap()
}

/// Worst difference of embeds and pooled from the fixture's `embeds`/`pooled` tensors
/// (measured: at most 5.7e-6 and 7.7e-7 over every case here; the UNet's output 3.6e-6).
fn check(what: &str, c: &Conditioning, embeds: &Tensor, pooled: &Tensor, tol: f64) {
    assert_eq!(c.embeds.dims(), embeds.dims(), "{what}: embeds shape");
    let de = max_abs_diff(&c.embeds, embeds);
    let dp = max_abs_diff(c.pooled.as_ref().unwrap(), pooled);
    assert!(
        de < tol && dp < tol,
        "{what}: embeds differ by {de}, pooled by {dp}"
    );
}

/// Each of `part`'s prompts encoded and checked against `<prefix>_embeds_<i>` and
/// `<prefix>_pooled_<i>`; their conditionings.
fn check_prompts(
    sd: &Pipeline,
    part: &serde_json::Value,
    exp: &HashMap<String, Tensor>,
    prefix: &str,
) -> Vec<Conditioning> {
    let prompts = part["prompts"].as_array().unwrap();
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let text = p["prompt"].as_str().unwrap();
            let c = sd.encode(text).unwrap();
            let (e, pooled) = (
                &exp[&format!("{prefix}_embeds_{i}")],
                &exp[&format!("{prefix}_pooled_{i}")],
            );
            check(text, &c, e, pooled, 1e-5);
            c
        })
        .collect()
}

/// The two-part embedding enters each encoder at its name's place, as diffusers'
/// `load_textual_inversion` on both encoders; the pooled embedding is read where diffusers
/// reads it (the legacy `eos_token_id` 2 pools at the highest id: the inversion's last added
/// token, not the end of text).
#[test]
fn sdxl_textual_inversion_matches_diffusers_on_both_encoders() {
    let (case, exp) = fixture();
    let mut sd = load(&[]);
    let ti = TextualInversion::load(&file("negxl.safetensors"), "negxl").unwrap();
    assert_eq!(ti.vectors.dims(), &[2, 32]);
    assert_eq!(ti.vectors_2.as_ref().unwrap().dims(), &[2, 40]);
    sd.add_textual_inversion(ti, &file("negxl.safetensors"))
        .unwrap();
    assert_eq!(
        check_prompts(&sd, &case["textual_inversion"], &exp, "ti").len(),
        4
    );
    // The fixture tells the two pooling rows apart: the end of text gives another vector.
    assert!(max_abs_diff(&exp["ti_pooled_0"], &exp["ti_pooled_eos_0"]) > 1e-2);
    // The embedding changes what it is used in (the fixture's prompt 3 names none).
    assert!(max_abs_diff(&exp["ti_embeds_1"], &exp["ti_embeds_3"]) > 1e-2);
}

#[test]
fn one_encoder_embeddings_are_refused_on_sdxl_and_two_part_ones_on_sd() {
    let mut sd = load(&[]);
    for (name, words) in [
        (
            "sd15_only.safetensors",
            &["sd15_only.safetensors", "SD 1.x/2.x", "clip_g"][..],
        ),
        (
            "clip_l_only.safetensors",
            &["clip_l_only.safetensors", "without clip_g"][..],
        ),
    ] {
        let e = TextualInversion::load(&file(name), "x")
            .and_then(|ti| sd.add_textual_inversion(ti, &file(name)))
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(e.contains(w), "{name}: {e}");
        }
    }
    let mut sd15 = Pipeline::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ti = TextualInversion::load(&file("negxl.safetensors"), "negxl").unwrap();
    let e = sd15
        .add_textual_inversion(ti, &file("negxl.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("negxl.safetensors") && e.contains("SDXL"), "{e}");
}

/// Both LoRA layouts merged into both text encoders and the UNet give diffusers' fused
/// pipeline: the prompt's encoding and the UNet's output on it.
#[test]
fn sdxl_loras_in_both_layouts_match_diffusers_fused_pipeline() {
    let (case, exp) = fixture();
    let lora = &case["lora"];
    let prompt = lora["prompt"].as_str().unwrap();
    let t = lora["timestep"].as_f64().unwrap();
    let latents = &exp["lora_latents"];
    for name in ["base", "kohya", "peft"] {
        let loras = match name {
            "base" => vec![],
            _ => {
                let scale = lora[name]["scale"].as_f64().unwrap();
                vec![Lora::load(&file(lora[name]["file"].as_str().unwrap()), scale).unwrap()]
            }
        };
        let sd = load(&loras);
        let c = sd.encode(prompt).unwrap();
        let (embeds, pooled) = (
            &exp[&format!("{name}_embeds")],
            &exp[&format!("{name}_pooled")],
        );
        check(name, &c, embeds, pooled, 1e-5);
        // The UNet on the reference's own conditioning: the UNet's merge alone.
        let cond = Conditioning {
            embeds: embeds.clone(),
            pooled: Some(pooled.clone()),
            mask: None,
        };
        let eps = sd
            .denoiser
            .forward(latents, t, &cond, Branch::Prompt)
            .unwrap();
        let want = &exp[&format!("{name}_eps")];
        let d = max_abs_diff(&eps, want);
        assert!(d < 1e-5, "{name}: UNet output differs by {d}");
        if name != "base" {
            let moved = max_abs_diff(want, &exp["base_eps"]);
            assert!(
                moved > 1e-3,
                "{name}: the LoRA hardly changes the UNet ({moved})"
            );
        }
    }
}

/// A diffusers LoRA saved beside transformers 4 names the first encoder's modules
/// `text_encoder.text_model.*`; the tiny model was saved by transformers 5 without
/// `text_model.`: the file still lands on the same weights.
#[test]
fn a_transformers_4_peft_file_meets_a_transformers_5_model() {
    let (case, exp) = fixture();
    let src = file("peft.safetensors");
    let renamed: HashMap<String, Tensor> = candle_core::safetensors::load(&src, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| match k.strip_prefix("text_encoder.") {
            Some(rest) => (format!("text_encoder.text_model.{rest}"), t),
            None => (k, t),
        })
        .collect();
    assert!(renamed
        .keys()
        .any(|k| k.starts_with("text_encoder.text_model.")));
    let tmp =
        std::env::temp_dir().join(format!("reneg-peft-t4-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&renamed, &tmp).unwrap();
    let sd = load(&[Lora::load(&tmp, 1.0).unwrap()]);
    let c = sd.encode(case["lora"]["prompt"].as_str().unwrap()).unwrap();
    check(
        "transformers-4 names",
        &c,
        &exp["peft_embeds"],
        &exp["peft_pooled"],
        1e-5,
    );
    let _ = std::fs::remove_file(&tmp);
}

/// An SD 1.5 LoRA (kohya's one-encoder `lora_te_`) on SDXL: refused by name, never merged
/// into SDXL's CLIP-L (which has the same width).
#[test]
fn an_sd15_lora_on_sdxl_is_refused() {
    let f = file("sd15_lora.safetensors");
    let e = Pipeline::load_with_loras(
        Path::new(PIPE),
        DType::F32,
        &Device::Cpu,
        &[Lora::load(&f, 1.0).unwrap()],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("sd15_lora.safetensors") && e.contains("SD 1.x/2.x"),
        "{e}"
    );
}

/// diffusers' SDXL `clip_skip`: both encoders read `hidden_states[-(skip + 2)]`, the pooled
/// embedding unchanged.
#[test]
fn sdxl_clip_skip_matches_diffusers() {
    let (case, exp) = fixture();
    let prompt = case["clip_skip"]["prompt"].as_str().unwrap();
    let mut sd = load(&[]);
    let plain = sd.encode(prompt).unwrap();
    let pooled = plain.pooled.clone().unwrap();
    check(
        "clip skip 0",
        &plain,
        &exp["clipskip0_embeds"],
        &pooled,
        1e-5,
    );
    sd.set_clip_skip(1).unwrap();
    let c = sd.encode(prompt).unwrap();
    check(
        "clip skip 1",
        &c,
        &exp["clipskip1_embeds"],
        &exp["clipskip1_pooled"],
        1e-5,
    );
    assert!(max_abs_diff(&exp["clipskip0_embeds"], &exp["clipskip1_embeds"]) > 1e-2);
    assert!(max_abs_diff(&pooled, &exp["clipskip1_pooled"]) < 1e-5);
}

/// A1111's chunks, BREAK and emphasis over both encoders (each weighted and re-meaned on its
/// own, concatenated along the width), the pooled embedding from the first chunk; prompts of
/// different chunk counts padded with the empty prompt's chunk in one batch.
#[test]
fn a1111_syntax_over_both_sdxl_encoders_matches_the_procedure() {
    let (case, exp) = fixture();
    let mut sd = load(&[]);
    sd.set_prompt_syntax(PromptSyntax::A1111).unwrap();
    let conds = check_prompts(&sd, &case["a1111"], &exp, "a1111");
    // Prompt 4 has three chunks, prompt 0 one: the batch pads prompt 0 with "".
    let batch = sd.encoder.batch(&[&conds[0], &conds[4]]).unwrap();
    assert_eq!(batch.embeds.dims(), &[2, 231, 72]);
    let empty = sd.encode("").unwrap();
    let tail = batch.embeds.get(0).unwrap().narrow(0, 77, 77).unwrap();
    assert_eq!(max_abs_diff(&tail, &empty.embeds.get(0).unwrap()), 0.0);
}
