//! SDXL end to end (issue 32) on the tiny parity model in diffusers' layout: training learns
//! both parts of the negative from the pipeline's own default (zeros), generate applies it,
//! size conditioning changes the image, eval runs; and the bad inputs of the issue get one line
//! and exit code 2. tests/parity.rs checks the numbers against diffusers.

macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

mod support;

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use support::{ok, refused};

const SDXL: &str = repo!("tests/fixtures/parity/sdxl-tiny/pipeline");
const SD15: &str = repo!("tests/fixtures/parity/sd15-tiny/pipeline");
const SD15_EMB: &str = repo!("../shared/data/reneg-official/sd1.5_reneg_emb.bin");
const EXTRAS_SD15_LORA: &str = repo!("tests/fixtures/sdxl_extras/sd15_lora.safetensors");
const EXTRAS_SD15_TI: &str = repo!("tests/fixtures/sdxl_extras/sd15_only.safetensors");
const NEGXL: &str = repo!("tests/fixtures/sdxl_extras/negxl.safetensors");
const KOHYA_XL: &str = repo!("tests/fixtures/sdxl_extras/kohya.safetensors");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");

/// A fresh folder for this file's `tag`.
fn tempdir(tag: &str) -> PathBuf {
    support::tempdir(&format!("sdxl-{tag}"))
}

/// Writes `tensors` as a safetensors file.
fn save(path: &Path, tensors: Vec<(String, Tensor)>) {
    candle_core::safetensors::save(&tensors.into_iter().collect(), path).unwrap();
}

fn png(path: &Path) -> Vec<u8> {
    reneg::io::read_png(path).unwrap().data
}

fn generate(tag: &str, extra: &[&str]) -> PathBuf {
    let out = tempdir(tag);
    let o = out.to_str().unwrap().to_string();
    let mut args = vec![
        "generate",
        "--model",
        SDXL,
        "--prompt",
        "a fox in the snow",
        "--height",
        "40",
        "--width",
        "56",
        "--steps",
        "4",
        "--seed",
        "1",
        "--out",
        &o,
    ];
    args.extend(extra);
    ok(&args);
    out
}

#[test]
fn train_learns_both_parts_from_zeros_and_generate_applies_them() {
    let out = tempdir("train");
    let prompts = out.join("prompts.txt");
    std::fs::write(&prompts, "a red fox\na boat on a lake\n").unwrap();
    let log = ok(&[
        "train",
        "--model",
        SDXL,
        "--height",
        "40",
        "--width",
        "56",
        "--prompts",
        prompts.to_str().unwrap(),
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--sampling-steps",
        "4",
        "--grad-step-window",
        "2",
        "--lr",
        "0.05",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        log.contains("zeros (force_zeros_for_empty_prompt)"),
        "{log}"
    );
    let emb = out.join("embedding.safetensors");
    let parts = candle_core::safetensors::load(&emb, &Device::Cpu).unwrap();
    let embeds = &parts["negative_prompt_embeds"];
    let pooled = &parts["negative_pooled_prompt_embeds"];
    assert_eq!(
        (embeds.dims(), pooled.dims()),
        (&[1, 77, 72][..], &[1, 24][..])
    );
    // Both parts moved away from the zeros they started from.
    for (name, t) in [("embeds", embeds), ("pooled", pooled)] {
        let m = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(m.to_scalar::<f32>().unwrap() > 1e-4, "{name} did not move");
    }
    let plain = generate("plain", &[]);
    let learned = generate("learned", &["--negative-embedding", emb.to_str().unwrap()]);
    assert_ne!(
        png(&plain.join("00000-seed1.png")),
        png(&learned.join("00000-seed1.png"))
    );
}

/// A community-style negative (two-part textual inversion) in the negative prompt, a kohya
/// SDXL LoRA, A1111 syntax and clip skip on one run: each changes the image (their numbers
/// against diffusers are tests/sdxl_extras.rs's), and the run records them.
#[test]
fn sdxl_inversions_loras_syntax_and_clip_skip_run_from_the_cli() {
    let image = |out: &Path| png(&out.join("00000-seed1.png"));
    let ti = format!("negxl={NEGXL}");
    let lora = format!("{KOHYA_XL}:0.7");
    // Each option against the same negative prompt without it.
    for (tag, negative, option) in [
        ("ti", "blurry, negxl", ["--embedding", ti.as_str()]),
        ("lora", "blurry", ["--lora", lora.as_str()]),
        ("a1111", "(blurry:1.5)", ["--prompt-syntax", "a1111"]),
        ("skip", "blurry", ["--clip-skip", "1"]),
    ] {
        let without = generate(&format!("{tag}-without"), &["--negative-prompt", negative]);
        let with = generate(
            &format!("{tag}-with"),
            &["--negative-prompt", negative, option[0], option[1]],
        );
        assert_ne!(
            image(&with),
            image(&without),
            "{tag} did not change the image"
        );
    }
    // The name must be loaded: a negative naming an unknown embedding is refused.
    let o = tempdir("extras-unknown");
    refused(
        &[
            "generate",
            "--model",
            SDXL,
            "--prompt",
            "x",
            "--negative-prompt",
            "embedding:negxl",
            "--out",
            o.to_str().unwrap(),
        ],
        &["negxl", "--embedding"],
    );
}

#[test]
fn size_conditioning_changes_the_image_and_is_recorded() {
    let plain = generate("sizes-plain", &[]);
    let sized = generate(
        "sizes",
        &["--original-size", "96,80", "--crops-coords-top-left", "8,4"],
    );
    assert_ne!(
        png(&plain.join("00000-seed1.png")),
        png(&sized.join("00000-seed1.png"))
    );
    let plan = std::fs::read_to_string(sized.join("generate.json")).unwrap();
    assert!(
        plan.contains("96") && plan.contains("crops_top_left"),
        "{plan}"
    );
    // The defaults are the image's own size: giving it explicitly changes nothing.
    let same = generate(
        "sizes-same",
        &["--original-size", "40,56", "--target-size", "40,56"],
    );
    assert_eq!(
        png(&plain.join("00000-seed1.png")),
        png(&same.join("00000-seed1.png"))
    );
}

#[test]
fn bad_inputs_on_sdxl_get_one_line_and_exit_code_2() {
    let dir = tempdir("bad");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    // An SD 1.5 embedding: the wrong width, and no pooled part.
    refused(
        &[
            "generate",
            "--model",
            SDXL,
            "--prompt",
            "x",
            "--negative-embedding",
            SD15_EMB,
            "--out",
            o,
        ],
        &["sd1.5_reneg_emb.bin", "768", "72"],
    );
    // A negative of the right width without its pooled part.
    let only = dir.join("no-pooled.safetensors");
    let t = Tensor::zeros((1, 77, 72), DType::F32, &Device::Cpu).unwrap();
    save(&only, vec![("negative_prompt_embeds".to_string(), t)]);
    refused(
        &[
            "generate",
            "--model",
            SDXL,
            "--prompt",
            "x",
            "--negative-embedding",
            only.to_str().unwrap(),
            "--out",
            o,
        ],
        &["no-pooled.safetensors", "pooled"],
    );
    // An SD 1.5 LoRA (kohya's one-encoder lora_te_) and an SD 1.5 textual inversion.
    for (flag, file, words) in [
        (
            "--lora",
            EXTRAS_SD15_LORA,
            &["sd15_lora.safetensors", "SD 1.x/2.x"][..],
        ),
        (
            "--embedding",
            EXTRAS_SD15_TI,
            &["sd15_only.safetensors", "clip_g"][..],
        ),
    ] {
        refused(
            &[
                "generate", "--model", SDXL, "--prompt", "x", flag, file, "--out", o,
            ],
            words,
        );
    }
    // An original-layout SDXL single file missing its second text encoder.
    let single = dir.join("sd_xl_base_1.0.safetensors");
    let w = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let name = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight";
    save(&single, vec![(name.to_string(), w)]);
    refused(
        &[
            "generate",
            "--model",
            single.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            o,
        ],
        &["sd_xl_base_1.0.safetensors", "Stable Diffusion XL"],
    );
    // Size conditioning on a model without it.
    refused(
        &[
            "generate",
            "--model",
            SD15,
            "--prompt",
            "x",
            "--original-size",
            "512,512",
            "--out",
            o,
        ],
        &["size conditioning", "sd15-tiny"],
    );
    assert!(!out.exists(), "a refused run wrote its output folder");
}
