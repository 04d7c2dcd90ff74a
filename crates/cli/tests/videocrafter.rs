//! VideoCrafter2 end to end (issue 31): the official SD 2.1 ReNeg embedding generates a clip
//! through a tiny model in VideoCrafter2's layout (lvdm's state dict as a `.ckpt`, its yaml),
//! whose text tower is 1024 wide as the real one; the family's defaults (guidance 12, eta 1,
//! 28 fps conditioning); and checkpoints whose pickle would run code are refused, running
//! nothing. tests/parity.rs checks the numbers against lvdm's own code.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

mod support;

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use support::{ok, refused};

const CASE: &str = repo!("tests/fixtures/parity/videocrafter2-tiny/model");
const SD21_EMB: &str = repo!("../shared/data/reneg-official/sd2.1_reneg_emb.bin");
const EVIL: &str = repo!("tests/fixtures/videocrafter/evil");

/// A fresh folder for this file's `tag`.
fn tempdir(tag: &str) -> PathBuf {
    support::tempdir(&format!("vc-{tag}"))
}

fn randn(seed: u64, shape: &[usize], scale: f64) -> Tensor {
    let mut rng = reneg::rng::SplitMix64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 7);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// The tiny parity case's model with its OpenCLIP text tower widened to 1024 (16 heads, two
/// blocks of which lvdm's penultimate layer runs one) and its spatial cross-attention taking
/// 1024-wide text: a model the official SD 2.1 embedding [1, 77, 1024] fits. Written as lvdm's
/// state dict in a `.ckpt` (a flat torch.save dict, which lvdm's loader also takes) beside its
/// yaml and open_clip config. Random weights, made once per test run (about 100 MB, most of it
/// the 49408-token table in f16).
fn wide_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempdir("wide").join("videocrafter2");
        std::fs::create_dir_all(&dir).unwrap();
        let case = Path::new(CASE);
        let mut sd =
            candle_core::safetensors::load(case.join("model.safetensors"), &Device::Cpu).unwrap();
        sd.retain(|k, _| !k.starts_with("cond_stage_model."));
        let (w, ff) = (1024, 64);
        let t = "cond_stage_model.model.";
        let mut text: Vec<(String, Tensor)> = vec![
            (
                format!("{t}token_embedding.weight"),
                randn(1, &[49408, w], 0.3),
            ),
            (format!("{t}positional_embedding"), randn(2, &[77, w], 0.1)),
            (
                format!("{t}ln_final.weight"),
                Tensor::ones(w, DType::F32, &Device::Cpu).unwrap(),
            ),
            (format!("{t}ln_final.bias"), randn(3, &[w], 0.05)),
            (format!("{t}text_projection"), randn(4, &[w, 32], 0.03)),
        ];
        for b in 0..2 {
            let p = format!("{t}transformer.resblocks.{b}.");
            let s = 10 * (b as u64 + 1);
            for (n, shape, scale) in [
                ("ln_1.weight", vec![w], 0.0),
                ("ln_1.bias", vec![w], 0.05),
                ("attn.in_proj_weight", vec![3 * w, w], 0.03),
                ("attn.in_proj_bias", vec![3 * w], 0.05),
                ("attn.out_proj.weight", vec![w, w], 0.03),
                ("attn.out_proj.bias", vec![w], 0.05),
                ("ln_2.weight", vec![w], 0.0),
                ("ln_2.bias", vec![w], 0.05),
                ("mlp.c_fc.weight", vec![ff, w], 0.03),
                ("mlp.c_fc.bias", vec![ff], 0.05),
                ("mlp.c_proj.weight", vec![w, ff], 0.1),
                ("mlp.c_proj.bias", vec![w], 0.05),
            ] {
                let v = if scale == 0.0 {
                    Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap()
                } else {
                    randn(s + text.len() as u64, &shape, scale)
                };
                text.push((format!("{p}{n}"), v));
            }
        }
        // Spatial transformers' cross-attention (block index 1 of an lvdm layer) reads the text.
        let cross = |k: &str| {
            k.contains(".1.transformer_blocks.0.attn2.")
                && (k.ends_with("to_k.weight") || k.ends_with("to_v.weight"))
        };
        let keys: Vec<String> = sd.keys().filter(|k| cross(k)).cloned().collect();
        assert!(!keys.is_empty());
        for (i, k) in keys.iter().enumerate() {
            let inner = sd[k].dim(0).unwrap();
            sd.insert(k.clone(), randn(100 + i as u64, &[inner, w], 0.02));
        }
        let mut all: Vec<(String, Tensor)> = sd.into_iter().collect();
        all.extend(text.into_iter().map(|(k, v)| {
            let v = if k.contains("token_embedding") {
                v.to_dtype(DType::F16).unwrap()
            } else {
                v
            };
            (k, v)
        }));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let refs: Vec<(&str, &Tensor)> = all.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let file = std::fs::File::create(dir.join("model.ckpt")).unwrap();
        reneg::torch_file::write_dict(&refs, std::io::BufWriter::new(file)).unwrap();
        let yaml = std::fs::read_to_string(case.join("config.yaml"))
            .unwrap()
            .replace("context_dim: 32", "context_dim: 1024");
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        let mut oc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case.join("open_clip_config.json")).unwrap(),
        )
        .unwrap();
        oc["text_cfg"]["width"] = w.into();
        oc["text_cfg"]["heads"] = 16.into();
        std::fs::write(dir.join("open_clip_config.json"), oc.to_string()).unwrap();
        dir
    })
}

fn generate(model: &str, tag: &str, extra: &[&str]) -> PathBuf {
    let out = tempdir(tag);
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a boat on a lake",
        "--frames",
        "3",
        "--steps",
        "4",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "3",
        "--out",
    ];
    let o = out.to_str().unwrap().to_string();
    args.push(&o);
    args.extend(extra);
    ok(&args);
    out
}

fn record(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("images.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

fn frame(out: &Path, k: usize) -> Vec<u8> {
    reneg::io::read_png(&out.join(format!("00000-seed3-frames/{k:03}.png")))
        .unwrap()
        .data
}

#[test]
fn official_sd21_embedding_generates_a_clip_through_a_videocrafter2_ckpt() {
    let model = wide_model().to_str().unwrap().to_string();
    let null = generate(&model, "null", &[]);
    let official = generate(&model, "official", &["--negative-embedding", SD21_EMB]);
    let rec = record(&official);
    // VideoCrafter2's script settings when none are given.
    assert_eq!(
        (
            &rec["guidance_scale"],
            &rec["eta"],
            &rec["fps"],
            &rec["frames"]
        ),
        (&12.0.into(), &1.0.into(), &28.into(), &3.into()),
        "{rec}"
    );
    assert!(rec["negative"]
        .as_str()
        .unwrap()
        .contains("sd2.1_reneg_emb.bin"));
    for k in 0..3 {
        assert_ne!(frame(&null, k), frame(&official, k), "frame {k}");
        assert_eq!(
            reneg::io::read_png(&official.join(format!("00000-seed3-frames/{k:03}.png")))
                .unwrap()
                .width,
            32
        );
    }
    // The frame rate conditions the model: another rate, another clip.
    let slow = generate(
        &model,
        "fps8",
        &["--negative-embedding", SD21_EMB, "--fps", "8"],
    );
    assert_eq!(record(&slow)["fps"], 8);
    assert_ne!(frame(&slow, 0), frame(&official, 0));
    // The checkpoint alone with its yaml given as --model-config loads the same model.
    let ckpt = wide_model().join("model.ckpt");
    let alone = generate(
        ckpt.to_str().unwrap(),
        "alone",
        &[
            "--negative-embedding",
            SD21_EMB,
            "--model-config",
            wide_model().join("config.yaml").to_str().unwrap(),
        ],
    );
    assert_eq!(frame(&alone, 1), frame(&official, 1));
}

#[test]
fn step_counts_lvdms_sampler_cannot_take_are_refused() {
    let model = wide_model().to_str().unwrap().to_string();
    let out = tempdir("steps3");
    refused(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--frames",
            "2",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
        &["--steps 3", "timestep 1000"],
    );
    refused(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--frames",
            "2",
            "--scheduler",
            "euler",
            "--out",
            out.to_str().unwrap(),
        ],
        &["euler", "use_scale"],
    );
    assert!(std::fs::read_dir(&out).unwrap().next().is_none());
}

/// A `model.ckpt` whose pickle would run a shell command if unpickled (a `__reduce__` to
/// os.system; a STACK_GLOBAL of builtins.eval) is refused by name with exit code 2, alone and
/// in a VideoCrafter folder, and the command never runs.
#[test]
fn checkpoints_that_would_run_code_are_refused_and_nothing_runs() {
    let marker = Path::new("/tmp/reneg-pwned");
    let _ = std::fs::remove_file(marker);
    let folder = tempdir("evil-folder");
    std::fs::copy(
        Path::new(CASE).join("config.yaml"),
        folder.join("config.yaml"),
    )
    .unwrap();
    for (file, global) in [
        ("reduce_os_system.ckpt", "posix.system"),
        ("global_builtins_eval.ckpt", "builtins.eval"),
    ] {
        let path = Path::new(EVIL).join(file);
        let out = tempdir("evil-out");
        refused(
            &[
                "generate",
                "--model",
                path.to_str().unwrap(),
                "--prompt",
                "x",
                "--out",
                out.to_str().unwrap(),
            ],
            &[file, global, "never code"],
        );
        std::fs::copy(&path, folder.join("model.ckpt")).unwrap();
        refused(
            &[
                "generate",
                "--model",
                folder.to_str().unwrap(),
                "--prompt",
                "x",
                "--out",
                out.to_str().unwrap(),
            ],
            &["model.ckpt", global],
        );
        assert!(std::fs::read_dir(&out).unwrap().next().is_none());
    }
    assert!(!marker.exists(), "a pickled command ran");
}
