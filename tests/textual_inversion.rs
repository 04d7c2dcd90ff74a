//! Textual-inversion embeddings (issue 19): the community formats load, and a prompt that names
//! one encodes as transformers encodes it with the vectors as added tokens
//! (tests/fixtures/ti, written by tools/gen_ti_fixtures.py).

mod common;

use candle_core::{DType, Device};
use common::max_abs_diff;
use reneg::embedding::textual_inversion::{parse_spec, split, Piece, TextualInversion};
use reneg::Pipeline;
use std::path::Path;

const FIX: &str = "tests/fixtures/ti";

fn model() -> Pipeline {
    Pipeline::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn both_community_formats_and_diffusers_files_load_the_same_vectors() {
    let pt = TextualInversion::load(&Path::new(FIX).join("tinyneg.pt"), "tinyneg").unwrap();
    let st =
        TextualInversion::load(&Path::new(FIX).join("tinyneg.safetensors"), "tinyneg").unwrap();
    assert_eq!(pt.vectors.dims(), &[3, 32]);
    assert_eq!(max_abs_diff(&pt.vectors, &st.vectors), 0.0);
    let bin =
        TextualInversion::load(&Path::new(FIX).join("learned_embeds.bin"), "<tinypos>").unwrap();
    assert_eq!(bin.vectors.dims(), &[1, 32]);
}

#[test]
fn prompts_using_an_embedding_encode_as_transformers_does() {
    let mut sd = model();
    sd.add_textual_inversion(
        TextualInversion::load(&Path::new(FIX).join("tinyneg.pt"), "tinyneg").unwrap(),
        Path::new("tinyneg.pt"),
    )
    .unwrap();
    sd.add_textual_inversion(
        TextualInversion::load(&Path::new(FIX).join("learned_embeds.bin"), "<tinypos>").unwrap(),
        Path::new("learned_embeds.bin"),
    )
    .unwrap();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(FIX).join("case.json")).unwrap())
            .unwrap();
    let expected =
        candle_core::safetensors::load(Path::new(FIX).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let prompts = case["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 6);
    for (i, p) in prompts.iter().enumerate() {
        let text = p["prompt"].as_str().unwrap();
        let got = sd.encode(text).unwrap().embeds;
        let want = &expected[&format!("prompt_embeds_{i}")];
        let err = max_abs_diff(&got, want);
        println!("{text:?}: max abs error {err:.2e}");
        // Measured at most 1.4e-6 (f32 rounding against transformers).
        assert!(err < 3e-6, "{text:?}: {err}");
    }
}

#[test]
fn a_prompt_without_names_encodes_exactly_as_before() {
    let plain = model();
    let mut with = model();
    with.add_textual_inversion(
        TextualInversion::load(&Path::new(FIX).join("tinyneg.pt"), "tinyneg").unwrap(),
        Path::new("tinyneg.pt"),
    )
    .unwrap();
    for text in [
        "a photo of a cat",
        "tinynegative is a word",
        "",
        "notinyneg",
    ] {
        let (a, b) = (
            plain.encode(text).unwrap().embeds,
            with.encode(text).unwrap().embeds,
        );
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{text:?}");
    }
}

#[test]
fn wrong_widths_and_undefined_names_are_refused_by_name() {
    let mut sd = model();
    let wide = Path::new(FIX).join("wide.safetensors");
    let e = sd
        .add_textual_inversion(TextualInversion::load(&wide, "wide").unwrap(), &wide)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wide.safetensors") && e.contains("width 48") && e.contains("32"),
        "{e}"
    );
    sd.add_textual_inversion(
        TextualInversion::load(&Path::new(FIX).join("tinyneg.pt"), "tinyneg").unwrap(),
        Path::new("tinyneg.pt"),
    )
    .unwrap();
    let e = sd
        .encode("embedding:easynegative, blurry")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embedding:easynegative") && e.contains("--embedding"),
        "{e}"
    );
    let e = TextualInversion::load(Path::new("tests/fixtures/embedding/not_a_tensor.pt"), "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not_a_tensor.pt"), "{e}");
}

#[test]
fn names_match_whole_words_ignoring_case() {
    let names = ["easyneg", "<tok>"];
    let p = split("EasyNeg, blurry, easynegative, (easyneg) a<tok>b", &names).unwrap();
    assert_eq!(
        p,
        vec![
            Piece::Embedding(0),
            Piece::Text(", blurry, easynegative, ("),
            Piece::Embedding(0),
            Piece::Text(") a"),
            Piece::Embedding(1),
            Piece::Text("b"),
        ]
    );
    assert_eq!(
        split("embedding:easyneg.", &names).unwrap(),
        vec![Piece::Embedding(0), Piece::Text(".")]
    );
    assert!(split("embedding:other", &names).is_err());
    assert_eq!(
        parse_spec("neg=a/b.pt"),
        ("neg".to_string(), "a/b.pt".into())
    );
    assert_eq!(
        parse_spec("a/EasyNegative.safetensors"),
        (
            "EasyNegative".to_string(),
            "a/EasyNegative.safetensors".into()
        )
    );
}
