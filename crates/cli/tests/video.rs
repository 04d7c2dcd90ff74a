//! Text-to-video end to end (issue 18): the official SD2.1 ReNeg embedding in a ModelScope-
//! layout model whose text encoder is 1024 wide as the real one, MP4 through ffmpeg, and
//! per-sample adaptation on a clip. tests/parity.rs checks the numbers against diffusers.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

#[path = "../../../tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use reneg::models::clip_text::{ClipTextConfig, ClipTextModel};
use reneg::models::unet::{UNet2DConditionModel, UNetConfig};
use reneg::weights::{Vb, Weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const MS: &str = repo!("tests/fixtures/parity/text2video-ms-tiny/pipeline");
const SD21_EMB: &str = repo!("../shared/data/reneg-official/sd2.1_reneg_emb.bin");
const SD15_EMB: &str = repo!("../shared/data/reneg-official/sd1.5_reneg_emb.bin");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-video-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn reneg(args: &[&str], path_env: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reneg"));
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    cmd.args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = reneg(args, None);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{args:?}: {err}");
    String::from_utf8_lossy(&o.stdout).to_string() + &err
}

/// Saves every tensor the model asked `vb` for, under its diffusers / transformers name.
fn save_vars(vb: &Vb, dtype: DType, path: &Path) {
    let tensors: HashMap<String, Tensor> = vb
        .vars()
        .into_iter()
        .map(|(name, v)| (name, v.as_tensor().to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// The ModelScope-like tiny case with its text encoder widened to 1024 (OpenCLIP ViT-H's
/// width, one layer) and its UNet's cross-attention to match: a model the official SD2.1
/// embedding [1, 77, 1024] fits. Random weights, made once per test run (about 100 MB, most
/// of it the 49408-token embedding table in f16).
fn wide_video_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = tempdir("wide-model").join("pipeline");
        common::copy_dir(Path::new(MS), &root);
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let te_cfg_path = root.join("text_encoder/config.json");
        let mut te = read(&te_cfg_path);
        te["hidden_size"] = 1024.into();
        te["projection_dim"] = 1024.into();
        te["num_attention_heads"] = 16.into();
        te["num_hidden_layers"] = 1.into();
        te["intermediate_size"] = 64.into();
        std::fs::write(&te_cfg_path, te.to_string()).unwrap();
        let vb = Vb::new(Weights::trainable(1, DType::F32, &Device::Cpu));
        ClipTextModel::new(ClipTextConfig::load(&te_cfg_path).unwrap(), &vb).unwrap();
        save_vars(
            &vb,
            DType::F16,
            &root.join("text_encoder/model.safetensors"),
        );

        let unet_cfg_path = root.join("unet/config.json");
        let mut unet = read(&unet_cfg_path);
        unet["cross_attention_dim"] = 1024.into();
        std::fs::write(&unet_cfg_path, unet.to_string()).unwrap();
        let vb = Vb::new(Weights::trainable(2, DType::F32, &Device::Cpu));
        UNet2DConditionModel::new(UNetConfig::load(&unet_cfg_path).unwrap(), &vb).unwrap();
        save_vars(
            &vb,
            DType::F32,
            &root.join("unet/diffusion_pytorch_model.safetensors"),
        );
        root
    })
}

fn frame_pixels(dir: &Path, k: usize) -> Vec<u8> {
    let path = dir.join(format!("00000-seed3-frames/{k:03}.png"));
    reneg::io::read_png(&path).unwrap().data
}

#[test]
fn official_sd21_embedding_generates_a_clip_on_a_1024_wide_video_model() {
    let model = wide_video_model().to_str().unwrap().to_string();
    let dir = tempdir("official");
    let run = |tag: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(tag);
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "a boat on a lake",
            "--frames",
            "3",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "48",
            "--seed",
            "3",
            "--out",
        ];
        let o = out.to_str().unwrap().to_string();
        args.push(&o);
        args.extend(extra);
        ok(&args);
        out
    };
    let null = run("null", &[]);
    let official = run("official", &["--negative-embedding", SD21_EMB]);
    let rec: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(official.join("images.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rec["frames"], 3);
    assert_eq!(rec["file"], "00000-seed3.apng");
    assert!(rec["negative"]
        .as_str()
        .unwrap()
        .contains("sd2.1_reneg_emb.bin"));
    // The embedding acts on every frame.
    for k in 0..3 {
        assert_ne!(
            frame_pixels(&null, k),
            frame_pixels(&official, k),
            "frame {k}"
        );
    }
}

#[test]
fn a_768_wide_embedding_is_refused_by_a_1024_wide_video_model() {
    let model = wide_video_model().to_str().unwrap().to_string();
    let out = tempdir("sd15-emb");
    let o = reneg(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--frames",
            "2",
            "--negative-embedding",
            SD15_EMB,
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(lines.len(), 1, "{err}");
    for needle in ["sd1.5_reneg_emb.bin", "768", "1024"] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    assert!(std::fs::read_dir(&out).unwrap().next().is_none());
}

/// A stand-in `ffmpeg` that records its arguments and the number of bytes it was fed, and
/// writes that count as the "video" to its last argument.
fn fake_ffmpeg(dir: &Path, succeed: bool) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = if succeed {
        format!(
            "#!/bin/sh\necho \"$@\" > {args}\nfor last; do :; done\nwc -c > \"$last\"\n",
            args = dir.join("ffmpeg-args").display()
        )
    } else {
        "#!/bin/sh\ncat > /dev/null\necho 'Unknown encoder libx264' >&2\nexit 1\n".to_string()
    };
    let path = bin.join("ffmpeg");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:/usr/bin:/bin", bin.display())
}

#[test]
fn mp4_through_ffmpeg_when_one_is_on_the_path() {
    let dir = tempdir("mp4");
    let path = fake_ffmpeg(&dir, true);
    let out = dir.join("out");
    let args = [
        "generate",
        "--model",
        MS,
        "--prompt",
        "a cat",
        "--frames",
        "5",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "48",
        "--fps",
        "12",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = reneg(&args, Some(&path));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // ffmpeg got every frame, 48 x 32 RGB, at the asked rate, and its file was renamed in.
    let written = std::fs::read_to_string(out.join("00000-seed3.mp4")).unwrap();
    assert_eq!(written.trim(), (5 * 48 * 32 * 3).to_string());
    let ffargs = std::fs::read_to_string(dir.join("ffmpeg-args")).unwrap();
    assert!(
        ffargs.contains("-s 48x32") && ffargs.contains("-r 12"),
        "{ffargs}"
    );
    let rec: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("images.jsonl"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    assert_eq!(rec["mp4"], "00000-seed3.mp4");
    assert_eq!(rec["fps"], 12);

    // A failing ffmpeg: a warning, the frames and the APNG still written, no MP4, no
    // temporary file left.
    let bad = tempdir("mp4-bad");
    let path = fake_ffmpeg(&bad, false);
    let out = bad.join("out");
    let mut args = args.to_vec();
    let o_str = out.to_str().unwrap().to_string();
    *args.last_mut().unwrap() = &o_str;
    let o = reneg(&args, Some(&path));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no MP4") && err.contains("libx264"), "{err}");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "00000-seed3-frames",
            "00000-seed3.apng",
            "generate.json",
            "images.jsonl"
        ],
        "{names:?}"
    );
}

#[test]
fn per_sample_adaptation_on_a_clip() {
    let dir = tempdir("adapt");
    let out = dir.join("out");
    let saved = dir.join("adapted");
    let text = ok(&[
        "generate",
        "--model",
        MS,
        "--prompt",
        "a red cube",
        "--frames",
        "3",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "48",
        "--seed",
        "3",
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--adapt-steps",
        "4",
        "--save-adapted",
        saved.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(text.contains("adapted reward"), "{text}");
    let e =
        reneg::embedding::NegativeEmbedding::load(&saved.join("00000-seed3.safetensors")).unwrap();
    // The reward gradient through all three frames' x0 raises the clip's mean aesthetic
    // (measured: 0.9972 -> 1.1040 in 4 steps); a wrong or zero gradient would not.
    let reward = |k: &str| e.metadata[k].parse::<f64>().unwrap();
    let (start, best) = (reward("reward_start"), reward("reward_best"));
    assert!(best > start + 0.05, "{start} -> {best}");
    assert!(out.join("00000-seed3.apng").is_file());
}

/// The frames of an animated PNG as `[frames, 3, H, W]` in [0, 1].
fn apng_frames(path: &Path) -> Tensor {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let n = reader.info().animation_control().unwrap().num_frames as usize;
    let mut frames = vec![];
    for _ in 0..n {
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let (w, h) = (info.width as usize, info.height as usize);
        let t = Tensor::from_vec(buf[..w * h * 3].to_vec(), (h, w, 3), &Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        frames.push((t / 255.0).unwrap());
    }
    Tensor::stack(&frames, 0).unwrap()
}

/// `reneg eval` on clips: each reward is the mean over the clip's frames, and the clip's
/// temporal consistency is recorded beside it; both recomputed here from the saved APNG.
#[test]
fn eval_scores_clips_per_frame_with_temporal_consistency() {
    let out = tempdir("eval");
    ok(&[
        "eval",
        "--model",
        MS,
        "--prompt",
        "a cat",
        "--seeds",
        "2",
        "--frames",
        "3",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "48",
        "--negative",
        "null",
        "--negative",
        "prompt:blurry",
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--out",
        out.to_str().unwrap(),
    ]);
    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 2 seeds x 2 negatives x (aesthetic + temporal consistency).
    assert_eq!(records.len(), 8);
    let reward = reneg::reward::load::load(
        reneg::reward::load::RewardKind::Aesthetic,
        Path::new(AESTHETIC),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for r in records.iter().filter(|r| r["reward"] == "aesthetic") {
        let clip = apng_frames(&out.join(r["image"].as_str().unwrap()));
        assert_eq!(clip.dim(0).unwrap(), 3);
        let prompts = vec!["a cat".to_string(); 3];
        let frames = reward.score(&clip, &prompts).unwrap();
        let mean = frames.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let first = frames.get(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let recorded = r["score"].as_f64().unwrap();
        // The saved frames are 8-bit; the scores were taken before that rounding, which moves
        // this tiny random reward by up to 5e-3 (measured) while its frames differ by ~1.
        assert!((recorded - mean).abs() < 1e-2, "{recorded} vs mean {mean}");
        assert!(
            (recorded - first).abs() > 0.1,
            "a first-frame score would also pass"
        );
        let tc = records
            .iter()
            .find(|t| t["reward"] == "temporal-consistency" && t["image"] == r["image"])
            .unwrap()["score"]
            .as_f64()
            .unwrap();
        let feats = reward
            .image_encoder()
            .unwrap()
            .image_features(&clip)
            .unwrap();
        let want = reneg::reward::temporal_consistency(&feats).unwrap();
        assert!((tc - want).abs() < 1e-2, "{tc} vs {want}");
        assert!(tc < 0.999, "the frames of a clip differ: {tc}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## temporal-consistency"), "{report}");
}

/// `reneg train` on clips: the config records the frames, and one step through the clip's
/// frames lowers that step's loss (raises the clip's reward).
#[test]
fn train_on_clips() {
    let dir = tempdir("train");
    // One step from `init`: the run's folder. Step 0's draws (prompt, seed, timestep) come
    // from the seed and the step alone, so both runs below score the same clip.
    let train = |tag: &str, init: Option<&Path>| -> PathBuf {
        let out = dir.join(tag);
        let init = init.map(|p| p.display().to_string());
        let mut args = vec![
            "train",
            "--model",
            MS,
            "--frames",
            "3",
            "--height",
            "32",
            "--width",
            "48",
            "--reward",
            "aesthetic",
            "--reward-model",
            AESTHETIC,
            "--prompts",
            repo!("tests/fixtures/train/train_prompts.txt"),
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--sampling-steps",
            "3",
            "--grad-step-window",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(i) = &init {
            args.extend(["--init", i]);
        }
        ok(&args);
        out
    };
    let loss = |out: &Path| -> f64 {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["step"], 0);
        v["loss"].as_f64().unwrap()
    };
    let first = train("first", None);
    let cfg = std::fs::read_to_string(first.join("config.toml")).unwrap();
    assert!(cfg.lines().any(|l| l == "frames = 3"), "{cfg}");
    // The loss of step 0 (minus the clip's mean aesthetic over its frames) at the null text,
    // then at the embedding that one step moved it to: the step goes downhill. A gradient of
    // the wrong sign, or one that missed the frames, would not lower it.
    let stepped = first.join("embedding.safetensors");
    let again = train("again", Some(&stepped));
    let (before, after) = (loss(&first), loss(&again));
    println!("step 0's loss {before:.6} at the null text, {after:.6} after one step");
    // Measured: -0.8974 -> -0.9298 (a drop of 0.032; a sign-flipped gradient raises it).
    assert!(after < before - 3e-3, "{before} -> {after}");
}

/// A text-to-video model by its hub id, from the local cache (the layout `huggingface-cli
/// download damo-vilab/text-to-video-ms-1.7b` leaves), gives the folder's clip.
#[test]
fn a_video_model_by_hub_id_from_the_local_cache() {
    let dir = tempdir("hub");
    let cache = dir.join("hub");
    let repo = cache.join("models--damo-vilab--text-to-video-ms-1.7b");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "4567cdef").unwrap();
    common::copy_dir(Path::new(MS), &repo.join("snapshots/4567cdef"));
    let run = |model: &str, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
            .args([
                "generate",
                "--model",
                model,
                "--offline",
                "--prompt",
                "a cat",
                "--frames",
                "2",
                "--steps",
                "2",
                "--height",
                "32",
                "--width",
                "48",
                "--seed",
                "3",
                "--out",
                out.to_str().unwrap(),
            ])
            .env("HF_HUB_CACHE", &cache)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (0..2).map(|k| frame_pixels(out, k)).collect::<Vec<_>>()
    };
    let by_id = run("damo-vilab/text-to-video-ms-1.7b", &dir.join("by-id"));
    let by_folder = run(MS, &dir.join("by-folder"));
    assert_eq!(by_id, by_folder);
}
