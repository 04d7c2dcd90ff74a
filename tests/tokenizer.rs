//! CLIP tokenizer ids against transformers 5.23's `CLIPTokenizer` (tokenizers backend) on the
//! prompts in `fixtures/tokenizer/clip_ids.json`, written by `tools/gen_parity.py`.

use reneg::tokenizer::ClipTokenizer;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids_eot_pad: Vec<u32>,
    ids_bang_pad: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string("tests/fixtures/tokenizer/clip_ids.json").unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(
        cases.len() >= 50,
        "the fixture must hold at least 50 prompts"
    );
    cases
}

fn check(tok: &ClipTokenizer, expected: impl Fn(&Case) -> &Vec<u32>, label: &str) {
    let mut failures = vec![];
    for case in cases() {
        let got = tok.encode(&case.text);
        if &got != expected(&case) {
            failures.push(format!(
                "{label}: {:?}\n  got      {:?}\n  expected {:?}",
                case.text,
                got,
                expected(&case)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn embedded_vocabulary_matches_transformers_sd1_padding() {
    let tok = ClipTokenizer::embedded("<|endoftext|>").unwrap();
    check(&tok, |c| &c.ids_eot_pad, "embedded, <|endoftext|> pad");
}

#[test]
fn embedded_vocabulary_matches_transformers_sd2_padding() {
    let tok = ClipTokenizer::embedded("!").unwrap();
    assert_eq!(tok.pad_id(), 0);
    check(&tok, |c| &c.ids_bang_pad, "embedded, ! pad");
}

#[test]
fn vocab_json_and_merges_layout_matches() {
    let dir = Path::new("tests/fixtures/parity/sd15-tiny/pipeline/tokenizer");
    assert!(dir.join("vocab.json").is_file() && !dir.join("tokenizer.json").exists());
    let tok = ClipTokenizer::from_dir(dir).unwrap();
    check(&tok, |c| &c.ids_eot_pad, "vocab.json + merges.txt");
}

#[test]
fn tokenizer_json_layout_matches() {
    let dir = Path::new("tests/fixtures/parity/sd2-tiny/pipeline/tokenizer");
    assert!(dir.join("tokenizer.json").is_file());
    let tok = ClipTokenizer::from_dir(dir).unwrap();
    check(&tok, |c| &c.ids_bang_pad, "tokenizer.json");
}

#[test]
fn empty_and_long_prompts_have_fixed_length() {
    let tok = ClipTokenizer::embedded("<|endoftext|>").unwrap();
    let empty = tok.encode("");
    assert_eq!(empty.len(), 77);
    assert_eq!(&empty[..3], &[49406, 49407, 49407]);
    let long = tok.encode(&"word ".repeat(200));
    assert_eq!(long.len(), 77);
    assert_eq!(long[76], 49407, "a truncated prompt still ends with EOS");
}

#[test]
fn missing_tokenizer_folder_is_an_error_naming_it() {
    let err = ClipTokenizer::from_dir(Path::new("tests/fixtures/no-such-dir"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

/// A long prompt without spaces (one 20,000-character word): the heap-based BPE merges it
/// (the time is printed, not asserted: speed is for benchmarks), the same ids every time, and
/// entity-laden open_clip input goes through the once-compiled regex.
#[test]
fn long_words_and_entities_tokenize() {
    let tok = reneg::tokenizer::ClipTokenizer::embedded("<|endoftext|>").unwrap();
    let word = "abcdefghij".repeat(2000);
    let t = std::time::Instant::now();
    let ids = tok.tokens(&word);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "20,000-character word: {} tokens in {:.1} ms",
        ids.len(),
        secs * 1e3
    );
    assert!(ids.len() > 1000, "{}", ids.len());
    // Deterministic, and a second call (from the cache) gives the same ids.
    assert_eq!(tok.tokens(&word), ids);
    // HTML entities in an open_clip tokenizer's input, many times (the regex is compiled once).
    let oc = reneg::tokenizer::ClipTokenizer::open_clip().unwrap();
    let text = "a &amp; b &#x41; &lt;c&gt; ".repeat(500);
    let ids = oc.tokens(&text);
    let expect = oc.tokens("a & b A <c> ");
    assert_eq!(
        ids.len(),
        500 * expect.len(),
        "entities unescaped the same way each time"
    );
}
