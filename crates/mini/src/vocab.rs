//! The miniature world's tokenizer: CLIP's byte-level BPE format (a `vocab.json` and a
//! `merges.txt` that transformers' `CLIPTokenizer` loads), with a vocabulary of the world's
//! words instead of CLIP's 49,408 tokens. A token-embedding table of the real size would be
//! most of each tiny model's bytes. Every byte keeps its token, so any text still tokenizes.

use crate::degrade::QUALITY_WORDS;
use crate::scene::{BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES};
use reneg::error::{Error, Result};
use reneg::tokenizer::{bytes_to_unicode, BOS, EOS};
use serde_json::json;
use std::path::Path;

/// Words outside the captions that negative prompts commonly use.
const NEGATIVE_WORDS: [&str; 18] = [
    "low",
    "quality",
    "bad",
    "worst",
    "ugly",
    "distorted",
    "noise",
    "blur",
    "jpeg",
    "artifacts",
    "pixelated",
    "dull",
    "faded",
    "grainy",
    "lowres",
    "deformed",
    "image",
    "of",
];

/// Every whole word the world's captions and negatives use, sorted, without duplicates.
pub fn words() -> Vec<String> {
    let mut text: Vec<&str> = vec!["a", "and", "on", "background"];
    text.extend(SIZES.iter().map(|s| s.0));
    text.extend(COLOURS.iter().map(|c| c.0));
    text.extend(BACKGROUNDS.iter().map(|c| c.0));
    text.extend(SHAPES.iter().map(|s| s.name()));
    text.extend(POSITIONS.iter().map(|p| p.0));
    text.extend(QUALITY_WORDS);
    text.extend(NEGATIVE_WORDS);
    let mut out: Vec<String> = text
        .iter()
        .flat_map(|t| t.split_whitespace())
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `(vocab in id order, merges in rank order)`. Ids: the 256 byte characters, their `</w>`
/// forms, one token per merge, then the start and end tokens last (CLIP's order, so the end
/// token has the highest id, which open_clip pools at). Each word adds the merges that build
/// it left to right (`r e` -> `re`, `re d</w>` -> `red</w>`). BPE applies merges by rank, so
/// where an earlier word's merge pairs up letters of a later word first, the later word stays
/// several tokens ("triangle" is `t ri an g l e</w>`), as in any BPE vocabulary; the
/// committed models were trained with exactly this tokenizer.
pub fn vocab_and_merges() -> (Vec<String>, Vec<(String, String)>) {
    let mut chars: Vec<char> = bytes_to_unicode().to_vec();
    chars.sort_unstable();
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in words() {
        let letters: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        let mut left = letters[0].clone();
        for (i, next) in letters.iter().enumerate().skip(1) {
            let right = if i + 1 == letters.len() {
                format!("{next}</w>")
            } else {
                next.clone()
            };
            let merged = format!("{left}{right}");
            if !merges.iter().any(|(a, b)| *a == left && *b == right) {
                merges.push((left.clone(), right));
                vocab.push(merged.clone());
            }
            left = merged;
        }
    }
    vocab.push(BOS.to_string());
    vocab.push(EOS.to_string());
    (vocab, merges)
}

pub fn vocab_size() -> usize {
    vocab_and_merges().0.len()
}

/// Writes a transformers `CLIPTokenizer` folder (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`, `special_tokens_map.json`).
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let (vocab, merges) = vocab_and_merges();
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    let config = json!({
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
    });
    let special = json!({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS});
    let files = [
        (
            "vocab.json",
            serde_json::to_string(&map).unwrap_or_default(),
        ),
        ("merges.txt", merges_txt),
        (
            "tokenizer_config.json",
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        ),
        (
            "special_tokens_map.json",
            serde_json::to_string_pretty(&special).unwrap_or_default(),
        ),
    ];
    for (name, text) in files {
        reneg::io::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}
