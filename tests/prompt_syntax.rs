//! Long prompts and A1111's emphasis syntax (issue 19) against the reference computed with
//! transformers' tokenizer and text encoder (tools/gen_prompt_syntax_fixtures.py,
//! tests/fixtures/prompt_syntax).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff};
use reneg::prompt_syntax::{parse, Part, PromptSyntax};
use reneg::Pipeline;
use std::path::Path;

const FIX: &str = "tests/fixtures/prompt_syntax";

fn model() -> Pipeline {
    let mut sd = Pipeline::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    sd.set_prompt_syntax(PromptSyntax::A1111).unwrap();
    sd
}

fn case() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(FIX).join("case.json")).unwrap())
        .unwrap()
}

#[test]
fn the_syntax_parses_as_the_reference_parses_it() {
    let c = case();
    for p in c["prompts"].as_array().unwrap() {
        let text = p["prompt"].as_str().unwrap();
        let want: Vec<(String, f64)> = p["parsed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x[0].as_str().unwrap().to_string(), x[1].as_f64().unwrap()))
            .collect();
        let got: Vec<(String, f64)> = parse(text)
            .into_iter()
            .map(|p| match p {
                Part::Text(t, w) => (t, w),
                Part::Break => ("BREAK".to_string(), -1.0),
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{text:?}: {got:?} vs {want:?}");
        for ((gt, gw), (wt, ww)) in got.iter().zip(&want) {
            assert_eq!(gt, wt, "{text:?}");
            assert!((gw - ww).abs() < 1e-12, "{text:?}: {gw} vs {ww}");
        }
    }
}

#[test]
fn long_and_weighted_prompts_encode_as_the_reference() {
    let sd = model();
    let c = case();
    let expected =
        candle_core::safetensors::load(Path::new(FIX).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    for (i, p) in c["prompts"].as_array().unwrap().iter().enumerate() {
        let text = p["prompt"].as_str().unwrap();
        let got = sd.encode(text).unwrap().embeds;
        let want = &expected[&format!("embeds_{i}")];
        assert_eq!(got.dims(), want.dims(), "{text:?}");
        let err = max_abs_diff(&got, want);
        let scale = max_abs(want);
        // Relative to the largest value, as the parity suite measures (the mean rescaling of
        // weighted chunks amplifies f32 rounding in both implementations).
        let rel = err / scale;
        println!(
            "{} chunk(s), max abs error {err:.2e} ({rel:.2e} of the largest value): {:.60}",
            got.dim(1).unwrap() / 77,
            text
        );
        assert!(rel < 1e-5, "{text:?}: {rel}");
    }
}

#[test]
fn plain_prompts_encode_exactly_as_before_and_contexts_pad_with_the_empty_chunk() {
    let sd = model();
    for text in ["a photo of a cat", "", "a cat: sitting, on a mat"] {
        let clip = sd.clip().unwrap();
        let old = clip
            .text_encoder
            .forward(&clip.tokenize(text).unwrap())
            .unwrap();
        let new = sd.encode(text).unwrap().embeds;
        let same = max_abs_diff(&old, &new);
        assert_eq!(same, 0.0, "{text:?}");
    }
    // Without A1111's syntax (the default) a long prompt is cut at 75 tokens and brackets are
    // text, as diffusers reads them.
    let mut plain = model();
    plain.set_prompt_syntax(PromptSyntax::Plain).unwrap();
    for text in [
        case()["prompts"][4]["prompt"].as_str().unwrap(),
        "a (red:1.3) cat BREAK a dog",
    ] {
        let got = plain.encode(text).unwrap().embeds;
        let clip = plain.clip().unwrap();
        let want = clip
            .text_encoder
            .forward(&clip.tokenize(text).unwrap())
            .unwrap();
        assert_eq!(got.dims(), &[1, 77, 32]);
        let d = max_abs_diff(&got, &want);
        assert_eq!(d, 0.0, "{text:?}");
    }
    // A one-chunk negative beside a two-chunk prompt: the negative gets the empty chunk.
    let short = sd.encode("blurry").unwrap();
    let long = sd.encode("a cat BREAK a dog").unwrap();
    let both = sd.batch(&[&short, &long]).unwrap().embeds;
    assert_eq!(both.dims(), &[2, 154, 32]);
    let tail: Tensor = both.get(0).unwrap().narrow(0, 77, 77).unwrap();
    let empty = sd.encode("").unwrap().embeds.squeeze(0).unwrap();
    let d = max_abs_diff(&tail, &empty);
    assert_eq!(d, 0.0);
}
