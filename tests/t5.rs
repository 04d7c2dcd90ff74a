//! PixArt-α's text side: T5's sentencepiece tokenizer from `tokenizer.json` and from
//! `spiece.model` alone against transformers (`tests/fixtures/t5_tokenizer/cases.json`, made
//! by `tools/gen_pixart_parity.py`, where sentencepiece itself and transformers agree on every
//! row), and the T5 v1.1 encoder against transformers' on the parity cases' prompts.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use reneg::models::t5::{T5Config, T5EncoderModel};
use reneg::t5_tokenizer::T5Tokenizer;
use reneg::weights::{Vb, Weights};
use std::path::Path;

const TOK: &str = "tests/fixtures/t5_tokenizer";

fn cases() -> Vec<serde_json::Value> {
    serde_json::from_str::<Vec<serde_json::Value>>(
        &std::fs::read_to_string(Path::new(TOK).join("cases.json")).unwrap(),
    )
    .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Both sources give transformers' ids and masks on every text (capitals, runs of spaces,
/// NBSP, composed and decomposed accents, full-width letters, emoji as <unk>, a text past L).
#[test]
fn t5_tokenizer_from_either_file_matches_transformers() {
    let dir = std::env::temp_dir().join(format!("reneg-spiece-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["spiece.model", "tokenizer_config.json"] {
        std::fs::copy(Path::new(TOK).join(f), dir.join(f)).unwrap();
    }
    let from_json = T5Tokenizer::from_dir(Path::new(TOK)).unwrap();
    let from_spiece = T5Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(from_json.vocab_size(), 610);
    assert_eq!(from_spiece.vocab_size(), 610);
    let all = cases();
    assert!(all.len() >= 15);
    for c in &all {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids_padded_to_L"]);
        let mask = ids(&c["attention_mask"]);
        for (what, tok) in [
            ("tokenizer.json", &from_json),
            ("spiece.model", &from_spiece),
        ] {
            let e = tok.encode(text, want.len()).unwrap();
            assert_eq!(e.ids, want, "{what}: {text:?}");
            assert_eq!(e.mask, mask, "{what}: {text:?}");
        }
        // Unpadded: the pieces and </s>.
        let unpadded = ids(&c["ids"]);
        let e = from_spiece.encode(text, unpadded.len()).unwrap();
        assert_eq!(e.ids, unpadded, "{text:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_without_a_tokenizer_file_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("reneg-notok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = T5Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(
        e.contains("reneg-notok") && e.contains("spiece.model"),
        "{e}"
    );
    std::fs::write(dir.join("spiece.model"), b"\x0a\x05hello").unwrap();
    let e = T5Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(
        e.contains("spiece.model") && e.contains("sentencepiece"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// transformers' bidirectional buckets (32 buckets, distance 128), written out from its
/// formula: exact up to 7 either way, logarithmic beyond, the far ones in the last bucket.
#[test]
fn relative_position_buckets_follow_transformers() {
    let b = |r| T5EncoderModel::bucket(r, 32, 128);
    assert_eq!((b(0), b(-1), b(-7), b(1), b(7)), (0, 1, 7, 17, 23));
    // 8 + trunc(ln(n / 8) / ln(16) * 8): n = 8 -> 8, 16 -> 10, 32 -> 12, 127 -> 15, 1000 -> 15.
    assert_eq!(
        (b(-8), b(-16), b(-32), b(-127), b(-1000)),
        (8, 10, 12, 15, 15)
    );
    assert_eq!((b(16), b(1000)), (26, 31));
}

/// The encoder on the parity cases' prompts and negatives, run with their masks: every row,
/// padding rows included, as transformers' `T5EncoderModel`.
#[test]
fn t5_encoder_matches_transformers_on_the_parity_cases() {
    for case in [
        "pixart-tiny",
        "pixart-tiny-empty",
        "pixart-tiny-ddim",
        "pixart-tiny-1024",
    ] {
        let dir = Path::new("tests/fixtures/parity").join(case);
        let exp =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let te = dir.join("pipeline/text_encoder");
        let cfg = T5Config::load(&te.join("config.json")).unwrap();
        let vb = Vb::new(
            Weights::load(&te.join("model.safetensors"), DType::F32, &Device::Cpu).unwrap(),
        );
        let model = T5EncoderModel::new(cfg, &vb).unwrap();
        for (ids, mask, embeds) in [
            ("prompt_input_ids", "prompt_attention_mask", "prompt_embeds"),
            (
                "negative_input_ids",
                "negative_prompt_attention_mask",
                "negative_prompt_embeds",
            ),
        ] {
            let out = model.forward(&exp[ids], Some(&exp[mask])).unwrap();
            let want: &Tensor = &exp[embeds];
            let rel = max_abs_diff(&out, want) / common::max_abs(want);
            // Measured: at most 4.3e-7 over the eight encodings.
            assert!(rel < 2e-6, "{case} {embeds}: relative difference {rel}");
        }
    }
}

/// T5-XXL ships in shards (`model-0000k-of-0000n.safetensors` with
/// `model.safetensors.index.json`): the same encoder from two shards of the tiny one gives
/// the same output; a shard that is missing, or does not hold what the index says, is refused
/// naming it.
#[test]
fn a_sharded_t5_loads_as_the_single_file() {
    use reneg::family::sd::{load_weights, TRANSFORMERS_WEIGHTS};
    let src = Path::new("tests/fixtures/parity/pixart-tiny/pipeline/text_encoder");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("reneg-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let cfg = T5Config::load(&dir.join("config.json")).unwrap();
    let sharded = load_weights(&dir, TRANSFORMERS_WEIGHTS, DType::F32, &Device::Cpu).unwrap();
    let sharded = T5EncoderModel::new(cfg.clone(), &Vb::new(sharded)).unwrap();
    let single = Weights::load(&src.join("model.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let single = T5EncoderModel::new(cfg, &Vb::new(single)).unwrap();
    let ids = Tensor::new(&[[3u32, 98, 6, 3, 79, 1, 0, 0]], &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(
            &sharded.forward(&ids, None).unwrap(),
            &single.forward(&ids, None).unwrap()
        ),
        0.0
    );
    // The fp16 variant's index name, as transformers writes it, is found too.
    let fp16 = dir.join("model.safetensors.index.fp16.json");
    std::fs::rename(&index, &fp16).unwrap();
    let w = load_weights(&dir, TRANSFORMERS_WEIGHTS, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.file(), fp16.as_path());
    std::fs::rename(&fp16, &index).unwrap();
    // A shard gone.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_weights(&dir, TRANSFORMERS_WEIGHTS, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("not found"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--text-cache`: encodings written by one run are read by the next, whose T5 is then never
/// read (its weights stay on disk) while every prompt is cached; a new prompt loads it and is
/// added. A cache of another encoder (the 1024 case's T5 is 40 wide) is refused by name.
#[test]
fn the_text_cache_spares_t5_and_refuses_another_encoders() {
    use reneg::family::pixart::T5Encoder;
    let pipe = Path::new("tests/fixtures/parity/pixart-tiny/pipeline");
    let dir = std::env::temp_dir().join(format!("reneg-text-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("t5.safetensors");
    let load = || reneg::Pipeline::load(pipe, DType::F32, &Device::Cpu).unwrap();
    let enc = |sd: &reneg::Pipeline| -> bool {
        sd.encoder
            .as_any()
            .downcast_ref::<T5Encoder>()
            .unwrap()
            .is_loaded()
    };
    let mut first = load();
    first.set_text_cache(&cache).unwrap();
    let a = first.encode("A red fox").unwrap();
    let b = first.encode("").unwrap();
    assert!(enc(&first) && cache.is_file());
    let mut second = load();
    second.set_text_cache(&cache).unwrap();
    // The key is the preprocessed text: case and outer spaces do not matter, as for T5.
    let a2 = second.encode("  a red FOX ").unwrap();
    let b2 = second.encode("").unwrap();
    assert!(
        !enc(&second),
        "T5 was read although every prompt was cached"
    );
    assert_eq!(max_abs_diff(&a.embeds, &a2.embeds), 0.0);
    assert_eq!(
        max_abs_diff(a.mask.as_ref().unwrap(), a2.mask.as_ref().unwrap()),
        0.0
    );
    assert_eq!(max_abs_diff(&b.embeds, &b2.embeds), 0.0);
    second.encode("a boat on a lake").unwrap();
    assert!(enc(&second));
    let mut third = load();
    third.set_text_cache(&cache).unwrap();
    third.encode("a boat on a lake").unwrap();
    assert!(!enc(&third), "the new prompt was not added to the file");
    let mut other = reneg::Pipeline::load(
        Path::new("tests/fixtures/parity/pixart-tiny-1024/pipeline"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = other.set_text_cache(&cache).err().unwrap().to_string();
    assert!(
        e.contains("t5.safetensors") && e.contains("another text encoder"),
        "{e}"
    );
    // SD has no use for it, and says so.
    let mut sd15 = reneg::Pipeline::load(
        Path::new("tests/fixtures/parity/sd15-tiny/pipeline"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = sd15.set_text_cache(&cache).err().unwrap().to_string();
    assert!(e.contains("--text-cache"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run encodes its prompts ahead (`Pipeline::encode_ahead`) and T5 is let go before
/// sampling: the prompts are then served from what was kept, equal to before, and a text
/// not encoded ahead reads T5 again.
#[test]
fn t5_is_let_go_once_a_runs_prompts_are_encoded() {
    use reneg::family::pixart::T5Encoder;
    let pipe = Path::new("tests/fixtures/parity/pixart-tiny/pipeline");
    let sd = reneg::Pipeline::load(pipe, DType::F32, &Device::Cpu).unwrap();
    let loaded = |sd: &reneg::Pipeline| {
        sd.encoder
            .as_any()
            .downcast_ref::<T5Encoder>()
            .unwrap()
            .is_loaded()
    };
    let direct = sd.encode("a red fox").unwrap();
    assert!(loaded(&sd));
    sd.encode_ahead(&["a red fox", "a blue whale"]).unwrap();
    assert!(
        !loaded(&sd),
        "T5 still held after the run's prompts were encoded"
    );
    let kept = sd.encode("a blue whale").unwrap();
    assert!(!loaded(&sd), "a prompt encoded ahead read T5 again");
    let again = sd.encode("a red fox").unwrap();
    assert_eq!(
        again
            .embeds
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        direct
            .embeds
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    let other = sd.encode("a green frog").unwrap();
    assert!(loaded(&sd), "a new text needs T5");
    assert_ne!(
        other
            .embeds
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        kept.embeds.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}
