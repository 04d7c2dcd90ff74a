//! The bad-input table (issue 16): missing, empty, truncated, wrong-shaped, wrong-dtype and
//! wrong-family files and bad flags across every subcommand. Each must exit with code 2, print
//! exactly one line on stderr that names the offending file or flag, never panic, and leave no
//! output file behind.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::files_under;

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

const SD15: &str = repo!("tests/fixtures/parity/sd15-tiny/pipeline");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");
const HPS: &str = repo!("tests/fixtures/parity/reward-openclip-gelu/reward");
const CN15: &str = repo!("tests/fixtures/parity/controlnet-sd15-tiny");
const CN2: &str = repo!("tests/fixtures/parity/controlnet-sd2-tiny/pipeline/controlnet");
const CN2_IMAGE: &str = repo!("tests/fixtures/parity/controlnet-sd2-tiny/control.png");
const T2V: &str = repo!("tests/fixtures/parity/text2video-ms-tiny/pipeline");
const SD21_EMB: &str = repo!("../shared/data/reneg-official/sd2.1_reneg_emb.bin");
const MALICIOUS: &str = repo!("tests/fixtures/embedding/malicious.pt");
const LEGACY: &str = repo!("tests/fixtures/embedding/legacy_format.pt");
const TORCH_SAVED: &str = repo!("tests/fixtures/embedding/torch_saved.pt");

/// The files the table's cases point at must exist: a case naming a missing file would pass on
/// "file not found", whose message names the file too, and never reach its check.
fn assert_fixtures_exist() {
    for f in [
        SD15,
        AESTHETIC,
        HPS,
        CN15,
        CN2,
        CN2_IMAGE,
        T2V,
        MALICIOUS,
        LEGACY,
        TORCH_SAVED,
    ] {
        assert!(Path::new(f).exists(), "fixture {f} is missing");
    }
    assert!(
        Path::new(SD21_EMB).is_file(),
        "{SD21_EMB} is missing: the official embeddings come from ../shared/data (beside the repository)"
    );
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn save(path: &Path, t: Tensor) {
    candle_core::safetensors::save(&[("e".to_string(), t)].into_iter().collect(), path).unwrap();
}

#[test]
fn every_bad_input_exits_2_with_one_line_and_leaves_nothing_behind() {
    assert_fixtures_exist();
    let d = tempdir("table");
    let p = |name: &str| d.join(name).to_str().unwrap().to_string();
    // Files the cases point at.
    std::fs::create_dir_all(d.join("empty-dir")).unwrap();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    std::fs::write(d.join("blank.txt"), "\n  \n").unwrap();
    std::fs::write(d.join("prompts.txt"), "a red cube\n").unwrap();
    std::fs::write(d.join("bad.json"), "{\"not\": [1, 2]").unwrap();
    std::fs::write(d.join("numbers.json"), "[1, 2, 3]").unwrap();
    std::fs::write(d.join("no-column.tsv"), "Text\tCategory\na cat\tAnimals\n").unwrap();
    std::fs::write(d.join("garbage.safetensors"), b"definitely not safetensors").unwrap();
    std::fs::write(d.join("image.png"), b"\x89PNG\r\n\x1a\n not really").unwrap();
    std::fs::write(d.join("a-file"), "x").unwrap();
    std::fs::write(d.join("pairs.jsonl"), "{\"image\": \"nope.png\"}\n").unwrap();
    std::fs::write(d.join("bad-config.toml"), "steps = \"many\"\n").unwrap();
    std::fs::write(d.join("unknown-key.toml"), "stepz = 3\n").unwrap();
    // A pipeline folder of a family reneg does not run (its class in model_index.json).
    common::copy_dir(Path::new(SD15), &d.join("flux-class"));
    let index = d.join("flux-class/model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replace("\"StableDiffusionPipeline\"", "\"FluxPipeline\""),
    )
    .unwrap();
    let emb = |name: &str, t: Tensor| save(&d.join(name), t);
    emb(
        "wide.safetensors",
        Tensor::zeros((1, 77, 768), DType::F32, &Device::Cpu).unwrap(),
    );
    emb(
        "short.safetensors",
        Tensor::zeros((1, 10, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    emb(
        "empty-emb.safetensors",
        Tensor::zeros((1, 0, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    emb(
        "ints.safetensors",
        Tensor::zeros((1, 77, 32), DType::U32, &Device::Cpu).unwrap(),
    );
    emb(
        "rank4.safetensors",
        Tensor::zeros((1, 1, 77, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let good = std::fs::read(repo!("tests/fixtures/embedding/torch_saved.safetensors")).unwrap();
    std::fs::write(d.join("truncated.safetensors"), &good[..good.len() / 2]).unwrap();
    let pt = std::fs::read(repo!("tests/fixtures/embedding/torch_saved.pt")).unwrap();
    std::fs::write(d.join("truncated.pt"), &pt[..pt.len() / 2]).unwrap();
    // Models: a corrupt UNet, an unknown scheduler, a wrong-family folder, a broken config.
    common::copy_dir(Path::new(SD15), &d.join("corrupt-unet"));
    std::fs::write(
        d.join("corrupt-unet/unet/diffusion_pytorch_model.safetensors"),
        b"garbage",
    )
    .unwrap();
    common::copy_dir(Path::new(SD15), &d.join("no-groups"));
    let cfg = d.join("no-groups/vae/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["norm_num_groups"] = serde_json::json!(0);
    std::fs::write(&cfg, v.to_string()).unwrap();
    common::copy_dir(Path::new(SD15), &d.join("log-linear"));
    let cfg = d.join("log-linear/scheduler/scheduler_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["interpolation_type"] = serde_json::json!("log_linear");
    std::fs::write(&cfg, v.to_string()).unwrap();
    common::copy_dir(Path::new(SD15), &d.join("no-unet-config"));
    std::fs::remove_file(d.join("no-unet-config/unet/config.json")).unwrap();

    let out = |i: usize| d.join(format!("out{i}"));
    // (arguments, what the one line must contain); `{out}` is the case's own output folder.
    let cases: Vec<(String, String)> = vec![
        // generate
        ("generate --model no/such/model --prompt x --out {out}".to_string(), "no/such/model".into()),
        (format!("generate --model {} --prompt x --out {{out}}", p("empty-dir")), "model_index.json".into()),
        (format!("generate --model {} --prompt x --out {{out}}", p("corrupt-unet")), "diffusion_pytorch_model.safetensors".into()),
        (format!("generate --model {} --prompt x --out {{out}}", p("no-groups")), "norm_num_groups".into()),
        (format!("generate --model {} --prompt x --out {{out}}", p("no-unet-config")), "config.json".into()),
        (format!("generate --model {AESTHETIC} --prompt x --out {{out}}"), "model_index.json".into()),
        (format!("generate --model {} --prompt x --out {{out}}", p("flux-class")), "names the pipeline FluxPipeline".into()),
        (format!("generate --model {SD15} --prompt x --guidance-rescale 1.5 --out {{out}}"), "--guidance-rescale".into()),
        (format!("train --model {SD15} --reward aesthetic --reward-model {AESTHETIC} --prompts {} --guidance-rescale 1.5 --out {{out}}", p("prompts.txt")), "guidance_rescale".into()),
        (format!("generate --model {} --prompt x --out {{out}}", p("garbage.safetensors")), "garbage.safetensors".into()),
        (format!("generate --model {SD15} --prompts {} --out {{out}}", p("empty.txt")), "empty.txt".into()),
        (format!("generate --model {SD15} --prompts {} --out {{out}}", p("blank.txt")), "blank.txt".into()),
        (format!("generate --model {SD15} --prompts {} --out {{out}}", p("bad.json")), "bad.json".into()),
        (format!("generate --model {SD15} --prompts {} --out {{out}}", p("numbers.json")), "numbers.json".into()),
        (format!("generate --model {SD15} --prompts {} --out {{out}}", p("no-column.tsv")), "no-column.tsv".into()),
        (format!("generate --model {SD15} --prompts no/such.txt --out {{out}}"), "no/such.txt".into()),
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", p("wide.safetensors")), "768".into()),
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", p("short.safetensors")), "short.safetensors".into()),
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", p("empty-emb.safetensors")), "empty-emb.safetensors".into()),
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", p("ints.safetensors")), "ints.safetensors".into()),
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", p("truncated.safetensors")), "truncated.safetensors".into()),
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", p("truncated.pt")), "truncated.pt".into()),
        (format!("generate --model {SD15} --prompt x --init-latents {} --out {{out}}", p("garbage.safetensors")), "garbage.safetensors".into()),
        (format!("generate --model {SD15} --prompt x --height 30 --out {{out}}"), "--height".into()),
        (format!("generate --model {SD15} --prompt x --steps 0 --out {{out}}"), "--steps".into()),
        (format!("generate --model {SD15} --prompt x --steps many --out {{out}}"), "--steps".into()),
        (format!("generate --model {SD15} --prompt x --precision bf16 --out {{out}}"), "bf16".into()),
        (format!("generate --model {SD15} --prompt x --precision f8 --out {{out}}"), "--precision".into()),
        (format!("generate --model {SD15} --prompt x --device tpu --out {{out}}"), "--device".into()),
        (format!("generate --model {SD15} --prompt x --out {}/out", p("a-file")), "a-file".into()),
        (format!("generate --model {SD15} --prompt x --reward aesthetic --reward-model {AESTHETIC} --batch-size 2 --out {{out}}"), "--batch-size".into()),
        (format!("generate --model {SD15} --prompt x --reward aesthetic --out {{out}}"), "--reward-model".into()),
        (format!("generate --model {SD15} --prompt x --reward hps --reward-model {} --out {{out}}", p("empty-dir")), "empty-dir".into()),
        // Textual-inversion embeddings (issue 19): another model's width, an undefined name,
        // a missing file, a file that holds no vectors.
        (format!("generate --model {SD15} --embedding {} --prompt x --out {{out}}", repo!("tests/fixtures/ti/wide.safetensors")), "wide.safetensors".into()),
        (format!("generate --model {SD15} --prompt cat,embedding:easynegative --out {{out}}"), "embedding:easynegative".into()),
        (format!("eval --model {SD15} --prompt embedding:easynegative --negative null --reward aesthetic --reward-model {AESTHETIC} --out {{out}}"), "embedding:easynegative".into()),
        (format!("generate --model {SD15} --embedding neg={} --prompt x --out {{out}}", p("missing.pt")), "missing.pt".into()),
        (format!("generate --model {SD15} --embedding {} --prompt x --out {{out}}", repo!("tests/fixtures/embedding/not_a_tensor.pt")), "not_a_tensor.pt".into()),
        // --clip-skip past the text encoder's layers, a missing --vae, no images per prompt.
        (format!("generate --model {SD15} --clip-skip 99 --prompt x --out {{out}}"), "--clip-skip".into()),
        (format!("generate --model {SD15} --vae {} --prompt x --out {{out}}", p("no-vae")), "no-vae".into()),
        (format!("generate --model {SD15} --num-images-per-prompt 0 --prompt x --out {{out}}"), "--num-images-per-prompt".into()),
        // Samplers: an unknown name, eta for a sampler without one, eta out of range, a model
        // config the chosen sampler cannot honour.
        (format!("generate --model {SD15} --scheduler dpm++3m --prompt x --out {{out}}"), "--scheduler".into()),
        (format!("generate --model {SD15} --scheduler euler --eta 0.5 --prompt x --out {{out}}"), "--eta".into()),
        (format!("generate --model {SD15} --eta 1.5 --prompt x --out {{out}}"), "--eta".into()),
        (format!("generate --model {} --scheduler euler --prompt x --out {{out}}", p("log-linear")), "interpolation_type".into()),
        (format!("eval --model {SD15} --scheduler heun --prompt x --negative null --reward aesthetic --reward-model {AESTHETIC} --out {{out}}"), "--scheduler".into()),
        (format!("train --model {SD15} --scheduler euler-a --eta 0.3 --reward aesthetic --reward-model {AESTHETIC} --prompts {} --out {{out}}", p("prompts.txt")), "eta".into()),
        // ControlNets: one for another model (its cross-attention width is the SD2 case's), a
        // control image of another size than asked for, a missing image, an image without a
        // ControlNet, a folder that is not one, a file that is not an image.
        (format!("generate --model {SD15} --controlnet {CN2} --control-image {CN2_IMAGE} --prompt x --out {{out}}"), "controlnet".into()),
        (format!("generate --model {CN15}/pipeline --controlnet {CN15}/pipeline/controlnet --control-image {CN15}/control.png --height 64 --width 64 --prompt x --out {{out}}"), "--control-image".into()),
        (format!("generate --model {CN15}/pipeline --controlnet {CN15}/pipeline/controlnet --prompt x --out {{out}}"), "--control-image".into()),
        (format!("generate --model {SD15} --control-image {CN2_IMAGE} --prompt x --out {{out}}"), "--controlnet".into()),
        (format!("generate --model {CN15}/pipeline --controlnet {} --control-image {CN15}/control.png --prompt x --out {{out}}", p("empty-dir")), "empty-dir".into()),
        (format!("generate --model {CN15}/pipeline --controlnet {CN15}/pipeline/controlnet --control-image {} --prompt x --out {{out}}", p("image.png")), "image.png".into()),
        (format!("generate --model {CN15}/pipeline --controlnet {CN15}/pipeline/controlnet --control-image {} --prompt x --out {{out}}", p("no-such.png")), "no-such.png".into()),
        (format!("train --model {CN15}/pipeline --controlnet {CN15}/pipeline/controlnet --reward aesthetic --reward-model {AESTHETIC} --prompts {} --out {{out}}", p("prompts.txt")), "control_image".into()),
        (format!("train --model {CN15}/pipeline --controlnet {CN15}/pipeline/controlnet --control-image {CN15}/control.png --height 64 --reward aesthetic --reward-model {AESTHETIC} --prompts {} --out {{out}}", p("prompts.txt")), "--control-image".into()),
        // LoRAs: a missing file, a file that is not a LoRA.
        (format!("generate --model {SD15} --lora {}:0.8 --prompt x --out {{out}}", p("missing-lora.safetensors")), "missing-lora.safetensors".into()),
        (format!("generate --model {SD15} --lora {} --prompt x --out {{out}}", repo!("tests/fixtures/embedding/torch_saved.safetensors")), "torch_saved.safetensors".into()),
        // Text-to-video: frames for an image model, no frames, no frame rate, a ControlNet
        // (image models only), an embedding of another width.
        (format!("generate --model {SD15} --prompt x --frames 4 --out {{out}}"), "--frames".into()),
        (format!("generate --model {T2V} --prompt x --frames 0 --out {{out}}"), "--frames".into()),
        (format!("generate --model {T2V} --prompt x --fps 0 --out {{out}}"), "--fps".into()),
        (format!("generate --model {T2V} --controlnet {CN15}/pipeline/controlnet --control-image {CN15}/control.png --prompt x --out {{out}}"), "makes videos".into()),
        (format!("generate --model {T2V} --prompt x --negative-embedding {SD21_EMB} --out {{out}}"), "embedding is [1, 77, 1024]".into()),
        (format!("train --model {SD15} --frames 3 --reward aesthetic --reward-model {AESTHETIC} --prompts {} --out {{out}}", p("prompts.txt")), "--frames".into()),
        (format!("eval --model {SD15} --prompt x --frames 3 --negative null --reward aesthetic --reward-model {AESTHETIC} --out {{out}}"), "--frames".into()),
        // eval
        (format!("eval --model {SD15} --prompt x --negative null --negative bogus:thing --reward aesthetic --reward-model {AESTHETIC} --out {{out}}"), "bogus".into()),
        (format!("eval --model {SD15} --prompt x --negative null --reward aesthetic --reward-model {AESTHETIC} --shard 3/2 --out {{out}}"), "--shard".into()),
        (format!("eval --model {SD15} --prompts {} --negative null --reward aesthetic --reward-model {AESTHETIC} --out {{out}}", p("empty.txt")), "empty.txt".into()),
        (format!("eval --model {SD15} --prompt x --negative {} --reward aesthetic --reward-model {AESTHETIC} --out {{out}}", p("wide.safetensors")), "wide.safetensors".into()),
        (format!("eval merge {} --out {{out}}", p("empty-dir")), "empty-dir".into()),
        // train
        (format!("train --model {SD15} --reward aesthetic --reward-model {AESTHETIC} --prompts {} --out {{out}}", p("empty.txt")), "empty.txt".into()),
        (format!("train --model {SD15} --reward aesthetic --reward-model {AESTHETIC} --prompts no/such.txt --out {{out}}"), "no/such.txt".into()),
        (format!("train --config {} --out {{out}}", p("bad-config.toml")), "bad-config.toml".into()),
        (format!("train --config {} --out {{out}}", p("unknown-key.toml")), "stepz".into()),
        ("train --config no/such.toml --out {out}".to_string(), "no/such.toml".into()),
        (format!("train --model {SD15} --reward judge-quality --reward-model {AESTHETIC} --prompts {} --out {{out}}", p("prompts.txt")), "judge".into()),
        (format!("train --model {SD15} --reward aesthetic --reward-model {AESTHETIC} --prompts {} --batch-size 3 --micro-batch-size 2 --out {{out}}", p("prompts.txt")), "batch".into()),
        (format!("train --model {SD15} --reward aesthetic --reward-model {AESTHETIC} --prompts {} --init file:{} --out {{out}}", p("prompts.txt"), p("wide.safetensors")), "wide.safetensors".into()),
        // score
        (format!("score --reward aesthetic --reward-model {AESTHETIC} {}", p("image.png")), "image.png".into()),
        (format!("score --reward aesthetic --reward-model {AESTHETIC} no/such.png"), "no/such.png".into()),
        // The offending file is the image the pairs file names.
        (format!("score --reward hps --reward-model {HPS} --pairs {}", p("pairs.jsonl")), "nope.png".into()),
        (format!("score --reward aesthetic --reward-model {} {}", p("empty-dir"), p("image.png")), "empty-dir".into()),
        // embedding
        (format!("embedding inspect {}", p("garbage.safetensors")), "garbage.safetensors".into()),
        (format!("embedding inspect {}", p("empty-emb.safetensors")), "empty-emb.safetensors".into()),
        (format!("embedding inspect {}", p("rank4.safetensors")), "rank4.safetensors".into()),
        // The refusals themselves, not a missing file's message (which names the file too).
        (format!("embedding inspect {MALICIOUS}"), "never code".into()),
        // A negative with a pooled part and a mask, on an SD model (no place for them).
        (format!("generate --model {SD15} --prompt x --negative-embedding {} --out {{out}}", repo!("tests/fixtures/embedding/parts.pt")), "has a negative_pooled_prompt_embeds part".into()),
        (format!("embedding inspect {LEGACY}"), "legacy (pre-1.6) PyTorch format".into()),
        (format!("embedding import {} --out {{out}}/e.safetensors", p("truncated.pt")), "truncated.pt".into()),
        (format!("embedding export {} --format pt --out {{out}}/e.pt", p("ints.safetensors")), "ints.safetensors".into()),
        (format!("embedding encode --model {} --text x --out {{out}}/e.safetensors", p("empty-dir")), "model_index.json".into()),
        // An evaluation plan file that is not one.
        (format!("eval --plan {} --out {{out}}", p("prompts.txt")), "not an evaluation plan".into()),
        // mini
        (format!("mini experiment --mini {} --out {{out}}", p("empty-dir")), "empty-dir".into()),
        // the kernel switch
        (format!("embedding inspect {TORCH_SAVED} RENEG_KERNELS=fast"), "RENEG_KERNELS".into()),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = vec![];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let o = out(i);
        let line = args.replace("{out}", o.to_str().unwrap());
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reneg"));
        if let Some(pos) = words.iter().position(|w| w.starts_with("RENEG_KERNELS=")) {
            let (k, v) = words.remove(pos).split_once('=').unwrap();
            cmd.env(k, v);
        } else {
            cmd.env_remove("RENEG_KERNELS");
        }
        let r = cmd.args(&words).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let left = files_under(&o);
        let ok = r.status.code() == Some(2)
            && lines.len() == 1
            && err.contains(needle.as_str())
            && !err.contains("panicked")
            && left.is_empty();
        if !ok {
            failures.push(format!(
                "case {i} `{line}`: exit {:?}, {} stderr line(s), wanted {needle:?}, left {left:?}:\n{err}",
                r.status.code(),
                lines.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
