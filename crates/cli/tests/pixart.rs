//! PixArt-α end to end (issue 33) on tiny models in diffusers' `PixArtAlphaPipeline` layout:
//! the official ReNeg embedding (no mask; rows 1-119 are T5's output for "") inspects, imports
//! and generates on a 4096-wide tiny model with the mask of ""; training learns the
//! embeddings with the mask fixed, from "", and generate applies them; the bad inputs of the
//! issue get one line and exit code 2. tests/parity.rs checks the numbers against diffusers.

macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

mod support;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use support::{ok, refused};

const PIXART: &str = repo!("tests/fixtures/parity/pixart-tiny/pipeline");
const OFFICIAL: &str = repo!("../shared/data/reneg-official/pixart-alpha_reneg_emb.bin");
const SD15_EMB: &str = repo!("../shared/data/reneg-official/sd1.5_reneg_emb.bin");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");

fn tempdir(tag: &str) -> PathBuf {
    support::tempdir(&format!("pixart-{tag}"))
}

/// Deterministic small values of `shape` (a sine of the index): weights of a random model.
fn values(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (0.05 * ((i as f64) * 0.7311 + seed).sin()) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn save(path: &Path, tensors: HashMap<String, Tensor>) {
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// The tiny pipeline with a 4096-wide T5 (one layer, 2 heads of 4, d_ff 8) and a transformer
/// whose caption projection takes 4096: the official embedding's width, in PixArt's layout.
fn wide_model(dir: &Path) -> PathBuf {
    let root = dir.join("pixart-4096");
    let src = Path::new(PIXART);
    for sub in ["tokenizer", "vae", "scheduler"] {
        copy_files(&src.join(sub), &root.join(sub));
    }
    std::fs::copy(src.join("model_index.json"), root.join("model_index.json")).unwrap();
    let (d, vocab, inner, ff) = (4096, 610, 8, 8);
    let te = root.join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab,
        "d_model": d, "d_kv": 4, "d_ff": ff, "num_layers": 1, "num_heads": 2,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"
    });
    std::fs::write(te.join("config.json"), cfg.to_string()).unwrap();
    let mut w = HashMap::new();
    let p = "encoder.block.0.layer.";
    for (name, shape) in [
        ("shared.weight".to_string(), vec![vocab, d]),
        (format!("{p}0.SelfAttention.q.weight"), vec![inner, d]),
        (format!("{p}0.SelfAttention.k.weight"), vec![inner, d]),
        (format!("{p}0.SelfAttention.v.weight"), vec![inner, d]),
        (format!("{p}0.SelfAttention.o.weight"), vec![d, inner]),
        (
            format!("{p}0.SelfAttention.relative_attention_bias.weight"),
            vec![32, 2],
        ),
        (format!("{p}1.DenseReluDense.wi_0.weight"), vec![ff, d]),
        (format!("{p}1.DenseReluDense.wi_1.weight"), vec![ff, d]),
        (format!("{p}1.DenseReluDense.wo.weight"), vec![d, ff]),
    ] {
        w.insert(name.clone(), values(&shape, name.len() as f64));
    }
    for n in [
        format!("{p}0.layer_norm.weight"),
        format!("{p}1.layer_norm.weight"),
        "encoder.final_layer_norm.weight".into(),
    ] {
        w.insert(n, Tensor::ones(d, DType::F32, &Device::Cpu).unwrap());
    }
    save(&te.join("model.safetensors"), w);
    let tr = root.join("transformer");
    std::fs::create_dir_all(&tr).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    cfg["caption_channels"] = d.into();
    std::fs::write(tr.join("config.json"), cfg.to_string()).unwrap();
    let mut w = candle_core::safetensors::load(
        src.join("transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let key = "caption_projection.linear_1.weight";
    let out = w[key].dim(0).unwrap();
    w.insert(key.into(), values(&[out, d], 3.0));
    save(&tr.join("diffusion_pytorch_model.safetensors"), w);
    root
}

fn generate(model: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox in the snow",
        "--height",
        "48",
        "--width",
        "64",
        "--steps",
        "4",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    ok(&args)
}

fn png(dir: &Path) -> Vec<u8> {
    reneg::io::read_png(&dir.join("00000-seed1.png"))
        .unwrap()
        .data
}

#[test]
fn the_official_embedding_inspects_imports_and_generates_with_the_mask_of_empty() {
    let dir = tempdir("official");
    let model = wide_model(&dir);
    let shown = ok(&["embedding", "inspect", OFFICIAL]);
    assert!(
        shown.contains("rows      1-119 bitwise equal") && shown.contains("mask of \"\""),
        "{shown}"
    );
    let imported = dir.join("official.safetensors");
    let said = ok(&[
        "embedding",
        "import",
        OFFICIAL,
        "--out",
        imported.to_str().unwrap(),
    ]);
    // Imported with the mask it is read with, and saying so.
    assert!(said.contains("the mask of \"\""), "{said}");
    let parts = candle_core::safetensors::load(&imported, &Device::Cpu).unwrap();
    let mask: Vec<f32> = parts["negative_prompt_attention_mask"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        (mask.len(), mask[0], mask.iter().sum::<f32>()),
        (120, 1.0, 1.0)
    );
    let log = generate(
        &model,
        &dir.join("official"),
        &["--negative-embedding", OFFICIAL],
    );
    assert!(log.contains("takes the mask of \"\""), "{log}");
    generate(
        &model,
        &dir.join("imported"),
        &["--negative-embedding", imported.to_str().unwrap()],
    );
    assert_eq!(png(&dir.join("official")), png(&dir.join("imported")));
    // It acts: the image differs from the pipeline's own negative ("").
    generate(&model, &dir.join("plain"), &[]);
    assert_ne!(png(&dir.join("official")), png(&dir.join("plain")));
    // With the mask of "" written out, the same image; with an all-ones mask, another (119
    // copies of the padding row would then be attended).
    let emb = candle_core::safetensors::load(&imported, &Device::Cpu).unwrap();
    let embeds = emb["negative_prompt_embeds"].clone();
    for (tag, ones, same) in [("masked", 1usize, true), ("all-ones", 120, false)] {
        let mut m = vec![0f32; 120];
        m[..ones].iter_mut().for_each(|v| *v = 1.0);
        let f = dir.join(format!("{tag}.safetensors"));
        let mut parts = HashMap::new();
        parts.insert("negative_prompt_embeds".to_string(), embeds.clone());
        parts.insert(
            "negative_prompt_attention_mask".to_string(),
            Tensor::from_vec(m, (1, 120), &Device::Cpu).unwrap(),
        );
        save(&f, parts);
        generate(
            &model,
            &dir.join(tag),
            &["--negative-embedding", f.to_str().unwrap()],
        );
        assert_eq!(
            png(&dir.join(tag)) == png(&dir.join("official")),
            same,
            "{tag}"
        );
    }
}

#[test]
fn train_learns_the_embeddings_with_the_mask_fixed_and_generate_applies_them() {
    let out = tempdir("train");
    let prompts = out.join("prompts.txt");
    std::fs::write(&prompts, "a red fox\na boat on a lake\n").unwrap();
    let log = ok(&[
        "train",
        "--model",
        PIXART,
        "--height",
        "48",
        "--width",
        "64",
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
    assert!(log.contains("the encoding of \"\""), "{log}");
    let emb = out.join("embedding.safetensors");
    let parts = candle_core::safetensors::load(&emb, &Device::Cpu).unwrap();
    // The mask is the one of "": 1 on row 0 alone, as it started.
    let mask: Vec<f32> = parts["negative_prompt_attention_mask"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(mask.iter().sum::<f32>(), 1.0);
    assert_eq!(mask[0], 1.0);
    // Masked rows get no gradient: rows 1-119 stay bitwise equal; row 0 moved.
    let shown = ok(&["embedding", "inspect", emb.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["identical_trailing_rows"], 119, "{shown}");
    let plain = out.join("plain");
    generate(Path::new(PIXART), &plain, &[]);
    let learned = out.join("learned");
    generate(
        Path::new(PIXART),
        &learned,
        &["--negative-embedding", emb.to_str().unwrap()],
    );
    assert_ne!(png(&plain), png(&learned));
}

#[test]
fn bad_inputs_on_pixart_get_one_line_and_exit_code_2() {
    let dir = tempdir("bad");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let gen = |emb: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            PIXART.into(),
            "--prompt".into(),
            "x".into(),
            "--negative-embedding".into(),
            emb.to_string(),
            "--out".into(),
            o.to_string(),
        ]
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&a, needles);
    };
    // A 768-wide (SD 1.5) embedding.
    run(gen(SD15_EMB), &["sd1.5_reneg_emb.bin", "768", "32"]);
    // A mask of the wrong length.
    let bad_mask = dir.join("mask-77.safetensors");
    let mut parts = HashMap::new();
    parts.insert(
        "negative_prompt_embeds".to_string(),
        values(&[1, 120, 32], 1.0),
    );
    parts.insert(
        "negative_prompt_attention_mask".to_string(),
        Tensor::ones((1, 77), DType::F32, &Device::Cpu).unwrap(),
    );
    save(&bad_mask, parts);
    run(
        gen(bad_mask.to_str().unwrap()),
        &[
            "mask-77.safetensors",
            "negative_prompt_attention_mask",
            "[1, 120]",
        ],
    );
    // No mask, and rows that are not T5's output for "".
    let no_mask = dir.join("no-mask.safetensors");
    let mut parts = HashMap::new();
    parts.insert(
        "negative_prompt_embeds".to_string(),
        values(&[1, 120, 32], 2.0),
    );
    save(&no_mask, parts);
    run(
        gen(no_mask.to_str().unwrap()),
        &["no-mask.safetensors", "negative_prompt_attention_mask"],
    );
    // A pipeline folder whose tokenizer has neither tokenizer.json nor spiece.model.
    let broken = dir.join("no-tokenizer");
    for sub in ["text_encoder", "transformer", "vae", "scheduler"] {
        copy_files(&Path::new(PIXART).join(sub), &broken.join(sub));
    }
    std::fs::create_dir_all(broken.join("tokenizer")).unwrap();
    std::fs::copy(
        Path::new(PIXART).join("model_index.json"),
        broken.join("model_index.json"),
    )
    .unwrap();
    run(
        vec![
            "generate".into(),
            "--model".into(),
            broken.to_str().unwrap().into(),
            "--prompt".into(),
            "x".into(),
            "--out".into(),
            o.into(),
        ],
        &["tokenizer", "spiece.model"],
    );
    assert!(!out.exists(), "a refused run wrote its output folder");
}

/// `eval` with the pipeline's own negative, a prompt and per-sample adaptation from "" (its
/// mask kept), and `embedding encode` of a PixArt prompt: embeddings and mask together.
#[test]
fn eval_adapts_per_sample_and_encode_writes_the_mask() {
    let dir = tempdir("eval");
    let out = dir.join("eval");
    let null = dir.join("null.safetensors");
    ok(&[
        "embedding",
        "encode",
        "--model",
        PIXART,
        "--text",
        "",
        "--out",
        null.to_str().unwrap(),
    ]);
    let per_sample = format!("per-sample:{}", null.display());
    ok(&[
        "eval",
        "--model",
        PIXART,
        "--prompt",
        "a red cube on a table",
        "--prompt",
        "a blue sphere",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--negative",
        "null",
        "--negative",
        "prompt:blurry",
        "--negative",
        &per_sample,
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--adapt-steps",
        "2",
        "--adapt-lr",
        "0.05",
        "--out",
        out.to_str().unwrap(),
    ]);
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 6, "{lines}");
    assert!(out.join("report.md").is_file());
    // Adaptation keeps its best, never below its start (null text's image from the same noise).
    let score = |neg: u64, prompt: &str| {
        recs.iter()
            .find(|r| r["negative"] == neg && r["prompt"] == prompt)
            .and_then(|r| r["score"].as_f64())
            .unwrap_or_else(|| panic!("no record for {neg} {prompt}: {lines}"))
    };
    for p in ["a red cube on a table", "a blue sphere"] {
        assert!(score(2, p) >= score(0, p) - 1e-4, "{p}: {lines}");
    }
    let enc = dir.join("fox.safetensors");
    ok(&[
        "embedding",
        "encode",
        "--model",
        PIXART,
        "--text",
        "A Red Fox ",
        "--out",
        enc.to_str().unwrap(),
    ]);
    let parts = candle_core::safetensors::load(&enc, &Device::Cpu).unwrap();
    assert_eq!(parts["negative_prompt_embeds"].dims(), &[1, 120, 32]);
    let mask: Vec<f32> = parts["negative_prompt_attention_mask"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = mask.iter().sum::<f32>() as usize;
    assert!(n > 1 && mask[..n].iter().all(|&m| m == 1.0) && mask[n..].iter().all(|&m| m == 0.0));
}

/// `--max-sequence-length` (diffusers' max_sequence_length): prompts and negatives of that
/// many tokens, as a pipeline called with it (PixArt-Sigma's is 300); a negative of the
/// default 120 rows is then refused by name.
#[test]
fn max_sequence_length_sets_the_prompt_length() {
    let dir = tempdir("length");
    let enc = |len: &str, out: &Path| {
        let mut args = vec![
            "embedding",
            "encode",
            "--model",
            PIXART,
            "--text",
            "a red cube",
            "--out",
            out.to_str().unwrap(),
        ];
        if !len.is_empty() {
            args.extend(["--max-sequence-length", len]);
        }
        ok(&args);
        candle_core::safetensors::load(out, &Device::Cpu).unwrap()
    };
    let short = enc("9", &dir.join("short.safetensors"));
    let long = enc("", &dir.join("long.safetensors"));
    let (e9, m9) = (
        &short["negative_prompt_embeds"],
        &short["negative_prompt_attention_mask"],
    );
    assert_eq!(e9.dims()[..2], [1, 9]);
    assert_eq!(long["negative_prompt_embeds"].dims()[..2], [1, 120]);
    // "a red cube" + </s> is 4 tokens or more, and fewer than 9: the shorter mask is the
    // longer one cut at 9, and the embeddings the same where both attend.
    let mask = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    let (m9, m120) = (mask(m9), mask(&long["negative_prompt_attention_mask"]));
    assert_eq!(
        m9.to_vec1::<f32>().unwrap(),
        m120.narrow(0, 0, 9).unwrap().to_vec1::<f32>().unwrap()
    );
    let kept = m9.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize;
    assert!((2..9).contains(&kept), "{kept} tokens kept");
    let rows = |t: &Tensor| t.narrow(1, 0, kept).unwrap().flatten_all().unwrap();
    let diff = (rows(e9) - rows(&long["negative_prompt_embeds"]))
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
    // Generate takes the 9-row negative with the same length, and refuses the 120-row one.
    let out = dir.join("gen");
    let short_neg = dir.join("short.safetensors");
    generate(
        Path::new(PIXART),
        &out,
        &[
            "--max-sequence-length",
            "9",
            "--negative-embedding",
            short_neg.to_str().unwrap(),
        ],
    );
    assert!(!png(&out).is_empty());
    let long_neg = dir.join("long.safetensors");
    refused(
        &[
            "generate",
            "--model",
            PIXART,
            "--prompt",
            "x",
            "--max-sequence-length",
            "9",
            "--negative-embedding",
            long_neg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["long.safetensors", "120", "9"],
    );
}
