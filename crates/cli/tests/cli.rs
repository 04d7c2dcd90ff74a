//! The `reneg` binary end to end, in temporary folders, on the parity pipelines.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

#[path = "../../../tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

const SD15: &str = repo!("tests/fixtures/parity/sd15-tiny/pipeline");

fn reneg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(args)
        .output()
        .unwrap()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn ok(args: &[&str]) {
    let o = reneg(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

/// Decoded RGB pixels of a PNG and its `parameters` text chunk.
fn read_png(path: &Path) -> (Vec<u8>, u32, u32, Option<String>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let params = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone());
    (buf, info.width, info.height, params)
}

fn gen_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate",
        "--model",
        SD15,
        "--prompt",
        "a red cube",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "5",
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn generate_writes_png_with_parameters_and_jsonl_deterministically() {
    let dir = tempdir("gen");
    let out = dir.to_str().unwrap();
    ok(&gen_args(out, &[]));
    let png = dir.join("00000-seed5.png");
    let (pixels, w, h, params) = read_png(&png);
    assert_eq!((w, h), (32, 32));
    let params = params.expect("a `parameters` text chunk");
    assert!(
        params.starts_with("a red cube\nNegative prompt: \nSteps: 3, Sampler: DDIM"),
        "{params}"
    );
    assert!(
        params.contains("Seed: 5") && params.contains("CFG scale: 7.5"),
        "{params}"
    );
    let lines = std::fs::read_to_string(dir.join("images.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(rec["seed"], 5);
    assert_eq!(rec["file"], "00000-seed5.png");
    // Same seed, same image, bit for bit.
    ok(&gen_args(out, &[]));
    assert_eq!(read_png(&png).0, pixels);
}

/// Every sampler runs from the command line, names itself in the PNG's parameters (A1111's
/// sampler names) and in images.jsonl, and draws its own image; a stochastic one (Euler
/// ancestral, DDIM with eta) is the same from the same seed and in any batch.
#[test]
fn every_scheduler_generates_and_records_itself() {
    let dir = tempdir("schedulers");
    let names = [
        ("ddim", "DDIM"),
        ("euler", "Euler"),
        ("euler-a", "Euler a"),
        ("dpm++2m", "DPM++ 2M"),
        ("dpm++2m-karras", "DPM++ 2M Karras"),
        ("unipc", "UniPC"),
        ("pndm", "PLMS"),
    ];
    let mut images: Vec<(String, Vec<u8>)> = vec![];
    for (name, label) in names {
        let out = dir.join(name.replace('+', "p"));
        let o = reneg(&gen_args(out.to_str().unwrap(), &["--scheduler", name]));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&format!("sampler: {label}\n")),
            "{name}"
        );
        let (pixels, .., params) = read_png(&out.join("00000-seed5.png"));
        let params = params.unwrap();
        assert!(params.contains(&format!("Sampler: {label}, ")), "{params}");
        let rec: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(out.join("images.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(rec["scheduler"], name);
        for (other, seen) in &images {
            assert_ne!(&pixels, seen, "{name} drew {other}'s image");
        }
        images.push((name.to_string(), pixels));
    }
    // The model's own sampler (its config names DDIM) is the default.
    let out = dir.join("default");
    ok(&gen_args(out.to_str().unwrap(), &[]));
    assert_eq!(read_png(&out.join("00000-seed5.png")).0, images[0].1);

    // Stochastic samplers: the same image again, and alone or in a batch of two prompts.
    for extra in [&["--scheduler", "euler-a"][..], &["--eta", "1"][..]] {
        let run = |tag: &str, more: &[&str]| {
            let out = dir.join(format!("{}-{tag}", extra.join("").replace('-', "")));
            let mut a = vec![
                "generate",
                "--model",
                SD15,
                "--steps",
                "3",
                "--height",
                "32",
                "--width",
                "32",
                "--prompt",
                "a red cube",
                "--prompt",
                "a blue ball",
                "--out",
            ];
            let o = out.to_str().unwrap().to_string();
            let mut args: Vec<String> = a.drain(..).map(String::from).collect();
            args.push(o);
            args.extend(extra.iter().chain(more).map(|s| s.to_string()));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ok(&refs);
            out
        };
        let one = run("one", &[]);
        let again = run("again", &[]);
        let two = run("two", &["--batch-size", "2"]);
        for f in ["00000-seed0.png", "00001-seed1.png"] {
            let x = read_png(&one.join(f)).0;
            assert_eq!(
                x,
                read_png(&again.join(f)).0,
                "{extra:?} {f}: not reproducible"
            );
            let y = read_png(&two.join(f)).0;
            let max = x.iter().zip(&y).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(max <= 1, "{extra:?} {f}: batched image differs by {max}");
        }
    }
    // eta changes DDIM's image.
    let eta = dir.join("ddim-eta");
    ok(&gen_args(eta.to_str().unwrap(), &["--eta", "1"]));
    assert_ne!(read_png(&eta.join("00000-seed5.png")).0, images[0].1);
}

#[test]
fn batches_and_prompt_files_give_the_same_images() {
    let dir = tempdir("batch");
    let txt = dir.join("p.txt");
    std::fs::write(&txt, "a red cube\n\na blue ball\n").unwrap();
    let one = dir.join("one");
    let two = dir.join("two");
    let base = [
        "generate", "--model", SD15, "--steps", "2", "--height", "32", "--width", "32",
    ];
    let mut a = base.to_vec();
    a.extend([
        "--prompts",
        txt.to_str().unwrap(),
        "--out",
        one.to_str().unwrap(),
    ]);
    ok(&a);
    let mut b = base.to_vec();
    b.extend([
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue ball",
        "--batch-size",
        "2",
    ]);
    b.extend(["--out", two.to_str().unwrap()]);
    ok(&b);
    for f in ["00000-seed0.png", "00001-seed1.png"] {
        let (x, ..) = read_png(&one.join(f));
        let (y, ..) = read_png(&two.join(f));
        let max = x.iter().zip(&y).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(max <= 1, "{f}: batched image differs by {max}");
    }
    // .tsv with a Prompt column and .json lists work too.
    let tsv = dir.join("p.tsv");
    std::fs::write(&tsv, "Prompt\tCategory\na red cube\tShapes\n").unwrap();
    let json = dir.join("p.json");
    std::fs::write(&json, r#"{"photo": ["a red cube"]}"#).unwrap();
    for f in [&tsv, &json] {
        let o = dir.join(f.extension().unwrap());
        let mut c = base.to_vec();
        c.extend([
            "--prompts",
            f.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ]);
        ok(&c);
        assert_eq!(
            read_png(&o.join("00000-seed0.png")).0,
            read_png(&one.join("00000-seed0.png")).0
        );
    }
}

#[test]
fn init_latents_reproduce_each_parity_case_image() {
    for case in [
        "sd15-tiny",
        "sd2-tiny",
        "sd-variant",
        "sd-rescale-tiny",
        "controlnet-sd15-tiny",
        "controlnet-sd2-tiny",
        "text2video-ms-tiny",
        "text2video-zs-tiny",
        "videocrafter2-tiny",
        "videocrafter2-tiny-f16",
    ] {
        let cdir = PathBuf::from(repo!("tests/fixtures/parity")).join(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cdir.join("case.json")).unwrap())
                .unwrap();
        let exp = candle_core::safetensors::load(cdir.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
        let dir = tempdir(&format!("init-{case}"));
        let lat = dir.join("init.safetensors");
        candle_core::safetensors::save(
            &[("init_latents".to_string(), exp["init_latents"].clone())]
                .into_iter()
                .collect(),
            &lat,
        )
        .unwrap();
        let s = |k: &str| meta[k].to_string().trim_matches('"').to_string();
        let (prompt, neg) = (
            meta["prompt"].as_str().unwrap(),
            meta["negative_prompt"].as_str().unwrap(),
        );
        let (g, n, h, w) = (
            s("guidance_scale"),
            s("num_inference_steps"),
            s("height"),
            s("width"),
        );
        // A VideoCrafter case's model is lvdm's checkpoint and yaml.
        let model = match meta["kind"] == "videocrafter" {
            true => cdir.join("model"),
            false => cdir.join("pipeline"),
        };
        // A ControlNet case: the pipeline's ControlNet, its image and scale (diffusers'
        // StableDiffusionControlNetPipeline made the reference).
        let cn = cdir.join("pipeline/controlnet");
        let control = cdir.join("control.png");
        let scale = s("controlnet_conditioning_scale");
        let extra: Vec<&str> = if meta["kind"] == "controlnet" {
            vec![
                "--controlnet",
                cn.to_str().unwrap(),
                "--control-image",
                control.to_str().unwrap(),
                "--controlnet-scale",
                &scale,
            ]
        } else {
            vec![]
        };
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--negative-prompt",
            neg,
            "--guidance-scale",
            &g,
            "--steps",
            &n,
            "--height",
            &h,
            "--width",
            &w,
            "--init-latents",
            lat.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ];
        let (frames, fps, eta) = (s("num_frames"), s("fps"), s("ddim_eta"));
        if meta["kind"] == "text2video" || meta["kind"] == "videocrafter" {
            args.extend(["--frames", &frames]);
        }
        if meta["kind"] == "videocrafter" {
            args.extend(["--fps", &fps, "--eta", &eta]);
        }
        let rescale = s("guidance_rescale");
        if meta.get("guidance_rescale").is_some() {
            args.extend(["--guidance-rescale", &rescale]);
        }
        args.extend(extra);
        ok(&args);
        // The reference image (or frame) `[3, H, W]` as 8-bit RGB, the same way the PNG writer
        // quantises.
        let to_u8 = |t: &Tensor| -> Vec<u8> {
            ((t.clamp(-1f32, 1f32).unwrap() + 1.0).unwrap() * 127.5)
                .unwrap()
                .round()
                .unwrap()
                .permute((1, 2, 0))
                .unwrap()
                .to_dtype(DType::U8)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let video = meta["kind"] == "text2video" || meta["kind"] == "videocrafter";
        let (got, want): (Vec<Vec<u8>>, Vec<Vec<u8>>) = if video {
            // Each frame's PNG against the reference video's frame; the APNG holds them all.
            let video = exp["video"].squeeze(0).unwrap();
            let n = video.dim(1).unwrap();
            assert_eq!(apng_frames(&dir.join("00000-seed0.apng")), n);
            (0..n)
                .map(|k| {
                    let png = dir.join(format!("00000-seed0-frames/{k:03}.png"));
                    let frame = video.narrow(1, k, 1).unwrap().squeeze(1).unwrap();
                    (read_png(&png).0, to_u8(&frame))
                })
                .unzip()
        } else {
            let image = exp["image"].squeeze(0).unwrap();
            (
                vec![read_png(&dir.join("00000-seed0.png")).0],
                vec![to_u8(&image)],
            )
        };
        for (pixels, want) in got.iter().zip(&want) {
            let max = pixels
                .iter()
                .zip(want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert_eq!(pixels.len(), want.len());
            assert!(
                max <= 1,
                "{case}: image differs from PyTorch's by {max} levels"
            );
        }
    }
}

/// The number of frames an animated PNG declares (its acTL chunk), checking it decodes.
fn apng_frames(path: &Path) -> usize {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let n = reader.info().animation_control().unwrap().num_frames as usize;
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    for _ in 0..n {
        reader.next_frame(&mut buf).unwrap();
    }
    n
}

#[test]
fn each_negative_source_works_and_changes_the_image() {
    let dir = tempdir("neg");
    let run = |tag: &str, extra: &[&str]| -> Vec<u8> {
        let out = dir.join(tag);
        ok(&gen_args(out.to_str().unwrap(), extra));
        read_png(&out.join("00000-seed5.png")).0
    };
    let null = run("null", &[]);
    let prompt = run("prompt", &["--negative-prompt", "blurry, low quality"]);
    assert_ne!(null, prompt, "a negative prompt changes the image");
    // The same text encoded into an embedding file gives the negative prompt's image exactly.
    let emb = dir.join("blurry.safetensors");
    ok(&[
        "embedding",
        "encode",
        "--model",
        SD15,
        "--text",
        "blurry, low quality",
        "--out",
        emb.to_str().unwrap(),
    ]);
    let from_file = run(
        "embedding",
        &["--negative-embedding", emb.to_str().unwrap()],
    );
    assert_eq!(from_file, prompt);
    // And as a PyTorch file.
    let pt = dir.join("blurry.bin");
    ok(&[
        "embedding",
        "export",
        emb.to_str().unwrap(),
        "--format",
        "pt",
        "--out",
        pt.to_str().unwrap(),
    ]);
    assert_eq!(
        run("pt", &["--negative-embedding", pt.to_str().unwrap()]),
        prompt
    );
    // A random embedding of the right shape changes it again.
    let rnd = dir.join("random.safetensors");
    let t = Tensor::randn(0f32, 1f32, (1, 77, 32), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("e".to_string(), t)].into_iter().collect(), &rnd).unwrap();
    assert_ne!(
        run("random", &["--negative-embedding", rnd.to_str().unwrap()]),
        null
    );
}

#[test]
fn bad_input_exits_2_with_one_line_naming_the_problem() {
    let dir = tempdir("bad");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let corrupt = dir.join("corrupt");
    common::copy_dir(Path::new(SD15), &corrupt);
    std::fs::write(
        corrupt.join("unet/diffusion_pytorch_model.safetensors"),
        b"garbage",
    )
    .unwrap();
    let sched = dir.join("sched");
    common::copy_dir(Path::new(SD15), &sched);
    let cfg = sched.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("DDIMScheduler", "FancyNewScheduler");
    std::fs::write(&cfg, text).unwrap();
    let wide = dir.join("wide.safetensors");
    let t = Tensor::zeros((1, 77, 768), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("e".to_string(), t)].into_iter().collect(), &wide).unwrap();
    let empty_prompts = dir.join("empty.txt");
    std::fs::write(&empty_prompts, "\n \n").unwrap();
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "x").unwrap();
    let blocked_out = a_file.join("out");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "generate".into(),
                "--model".into(),
                "no/such/dir".into(),
                "--prompt".into(),
                "x".into(),
            ],
            "no/such/dir",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                s(&empty),
                "--prompt".into(),
                "x".into(),
            ],
            "model_index.json",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                s(&corrupt),
                "--prompt".into(),
                "x".into(),
            ],
            "unet/diffusion_pytorch_model.safetensors",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                s(&sched),
                "--prompt".into(),
                "x".into(),
            ],
            "FancyNewScheduler",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompt".into(),
                "x".into(),
                "--negative-embedding".into(),
                s(&wide),
            ],
            "768",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompt".into(),
                "x".into(),
                "--negative-embedding".into(),
                repo!("tests/fixtures/embedding/not_a_tensor.pt").into(),
            ],
            "not a single tensor",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompts".into(),
                s(&empty_prompts),
            ],
            "no prompts",
        ),
        (
            vec!["generate".into(), "--model".into(), SD15.into()],
            "no prompts",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompt".into(),
                "x".into(),
                "--out".into(),
                s(&blocked_out),
            ],
            "output folder",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompt".into(),
                "x".into(),
                "--height".into(),
                "30".into(),
            ],
            "--height",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompt".into(),
                "x".into(),
                "--dtype".into(),
                "bf16".into(),
            ],
            "bf16",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                SD15.into(),
                "--prompt".into(),
                "x".into(),
                "--device".into(),
                "cuda:0".into(),
            ],
            "CUDA",
        ),
        (
            vec![
                "embedding".into(),
                "inspect".into(),
                repo!("tests/fixtures/embedding/malicious.pt").into(),
            ],
            "os.system",
        ),
        (
            vec![
                "embedding".into(),
                "export".into(),
                s(&wide),
                "--format".into(),
                "pt".into(),
                "--out".into(),
                s(&blocked_out),
            ],
            "a-file",
        ),
    ];
    // Cases without --out write to the default `out` of the working folder: a scratch one, so
    // the tests never leave folders in the crate.
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    for (args, needle) in cases {
        let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
            .current_dir(&cwd)
            .args(&args)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn single_file_checkpoint_gives_the_folders_image() {
    let dir = tempdir("single");
    let folder = dir.join("folder");
    let single = dir.join("single");
    ok(&gen_args(folder.to_str().unwrap(), &[]));
    // The tiny text encoder's head count is not inferable from shapes: pass its config.
    let cfg = dir.join("cfg");
    std::fs::create_dir_all(cfg.join("text_encoder")).unwrap();
    std::fs::copy(
        format!("{SD15}/text_encoder/config.json"),
        cfg.join("text_encoder/config.json"),
    )
    .unwrap();
    let mut args = gen_args(
        single.to_str().unwrap(),
        &["--model-config", cfg.to_str().unwrap()],
    );
    args[2] = repo!("tests/fixtures/parity/sd15-tiny/single_file.safetensors");
    ok(&args);
    assert_eq!(
        read_png(&single.join("00000-seed5.png")).0,
        read_png(&folder.join("00000-seed5.png")).0
    );
}

#[test]
fn hub_repo_ids_resolve_in_the_local_cache_only() {
    let dir = tempdir("hub");
    let cache = dir.join("hub");
    let repo = cache.join("models--acme--tiny-sd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    common::copy_dir(Path::new(SD15), &repo.join("snapshots/0123abcd"));
    let out = dir.join("out");
    let mut args = gen_args(out.to_str().unwrap(), &["--offline"]);
    args[2] = "acme/tiny-sd";
    let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(&args)
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("00000-seed5.png").is_file());
    args[2] = "acme/not-downloaded";
    let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(&args)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("acme/not-downloaded") && err.contains("huggingface-cli download"),
        "{err}"
    );
}

#[test]
fn score_prints_a_table_and_writes_json() {
    let dir = tempdir("score");
    ok(&gen_args(dir.to_str().unwrap(), &[]));
    let png = dir.join("00000-seed5.png");
    let out = dir.join("scores.json");
    let o = reneg(&[
        "score",
        "--reward",
        "hps",
        "--reward-model",
        repo!("tests/fixtures/parity/reward-openclip-gelu/reward"),
        "--prompt",
        "a red cube",
        "--out",
        out.to_str().unwrap(),
        png.to_str().unwrap(),
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(table.lines().count(), 3, "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let scores = v["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 2);
    assert_eq!(scores[0]["score"], scores[1]["score"]);
    let s = scores[0]["score"].as_f64().unwrap();
    assert!(s.abs() <= 100.0 && s != 0.0, "{s}");
    // The same pair from a JSONL file (paths relative to the file) scores the same.
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"image\": \"00000-seed5.png\", \"prompt\": \"a red cube\"}\n",
    )
    .unwrap();
    let o = reneg(&[
        "score",
        "--reward",
        "hps",
        "--reward-model",
        repo!("tests/fixtures/parity/reward-openclip-gelu/reward"),
        "--pairs",
        pairs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v2["scores"][0]["score"].as_f64().unwrap(), s);
    // The aesthetic reward needs no prompt.
    let o = reneg(&[
        "score",
        "--reward",
        "aesthetic",
        "--reward-model",
        repo!("tests/fixtures/parity/reward-aesthetic/reward"),
        "--out",
        out.to_str().unwrap(),
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Bad input: prompt count, unknown reward name, wrong layout.
    for (args, needle) in [
        (
            vec![
                "score",
                "--reward",
                "hps",
                "--reward-model",
                repo!("tests/fixtures/parity/reward-openclip-gelu/reward"),
                "--prompt",
                "a",
                "--prompt",
                "b",
                "--prompt",
                "c",
                png.to_str().unwrap(),
                png.to_str().unwrap(),
            ],
            "3 prompts for 2 images",
        ),
        (
            vec![
                "score",
                "--reward",
                "imagereward",
                "--reward-model",
                "x",
                png.to_str().unwrap(),
            ],
            "imagereward",
        ),
        (
            vec![
                "score",
                "--reward",
                "pickscore",
                "--reward-model",
                repo!("tests/fixtures/parity/reward-openclip-gelu/reward"),
                "--prompt",
                "a",
                png.to_str().unwrap(),
            ],
            "--reward hps",
        ),
    ] {
        let o = reneg(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--model",
        SD15,
        "--reward",
        "aesthetic",
        "--reward-model",
        repo!("tests/fixtures/parity/reward-aesthetic/reward"),
        "--prompts",
        repo!("tests/fixtures/train/train_prompts.txt"),
        "--out",
        out,
        "--batch-size",
        "1",
        "--sampling-steps",
        "3",
        "--grad-step-window",
        "2",
        "--height",
        "32",
        "--width",
        "32",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn train_from_toml_and_flags_writes_its_outputs_and_resumes() {
    let dir = tempdir("train");
    let cfg = dir.join("cfg.toml");
    std::fs::write(&cfg, "steps = 3\ncheckpoint_every = 2\nlr = 0.02\n").unwrap();
    let out = dir.join("run");
    let flags = [
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "4",
        "--backward",
        "one-pass",
    ];
    ok(&train_args(out.to_str().unwrap(), &flags));
    let written = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        written.contains("backward = \"one-pass\""),
        "the backward flag is recorded: {written}"
    );
    assert!(
        written.contains("steps = 4"),
        "flags override the file: {written}"
    );
    assert!(
        written.contains("lr = 0.02"),
        "the file's values are kept: {written}"
    );
    let emb =
        reneg::embedding::NegativeEmbedding::load(&out.join("embedding.safetensors")).unwrap();
    assert_eq!(emb.metadata.get("steps").map(String::as_str), Some("4"));
    assert!(emb.metadata.get("reward").unwrap().contains("aesthetic"));
    // The .bin is the torch-loadable twin.
    let bin = reneg::embedding::NegativeEmbedding::load(&out.join("embedding.bin")).unwrap();
    assert_eq!(
        bin.tensor.to_vec3::<f32>().unwrap(),
        emb.tensor.to_vec3::<f32>().unwrap()
    );
    // Resuming a finished run is a no-op that keeps the result: it begins at the
    // checkpoint's last step and writes no step again.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let o = reneg(&train_args(
        out.to_str().unwrap(),
        &[&flags[..], &["--resume"]].concat(),
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("resumed at step 4"), "{said}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        metrics,
        "a finished run resumed ran steps again"
    );
    let again =
        reneg::embedding::NegativeEmbedding::load(&out.join("embedding.safetensors")).unwrap();
    assert_eq!(
        again.tensor.to_vec3::<f32>().unwrap(),
        emb.tensor.to_vec3::<f32>().unwrap()
    );
}

/// `embedding inspect` names every part of a negative (issue 30): a pooled embedding and an
/// attention mask beside the embeddings, in the text and the JSON output.
#[test]
fn inspect_shows_each_part_of_a_negative() {
    let file = repo!("tests/fixtures/embedding/parts.pt");
    let o = reneg(&["embedding", "inspect", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("shape     [1, 5, 32]"), "{text}");
    assert!(
        text.contains("part      negative_pooled_prompt_embeds [1, 8]")
            && text.contains("part      negative_prompt_attention_mask [1, 5]"),
        "{text}"
    );
    let o = reneg(&["embedding", "inspect", "--json", file]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "negative_prompt_attention_mask"
        ]
    );
    // A one-part file shows no other part.
    let o = reneg(&[
        "embedding",
        "inspect",
        repo!("tests/fixtures/embedding/torch_saved.pt"),
    ]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("part "));
}

/// `--checkpointing on` (each UNet layer and decoder block recomputed in the backward)
/// learns the embedding `--checkpointing off` learns, and each run says which it does.
/// (tests/dispatch.rs checks that the checkpointed graph is smaller and really recomputed.)
#[test]
fn train_with_checkpointing_on_learns_what_off_learns() {
    let dir = tempdir("train-checkpointing");
    let run = |mode: &str| -> Vec<f32> {
        let out = dir.join(mode);
        let o = reneg(&train_args(
            out.to_str().unwrap(),
            &["--steps", "2", "--checkpointing", mode],
        ));
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(
            said.contains(&format!("activation checkpointing {mode}")),
            "{mode}: {said}"
        );
        let written = std::fs::read_to_string(out.join("config.toml")).unwrap();
        assert!(
            written.contains(&format!("checkpointing = \"{mode}\"")),
            "{written}"
        );
        reneg::embedding::NegativeEmbedding::load(&out.join("embedding.safetensors"))
            .unwrap()
            .tensor
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (on, off) = (run("on"), run("off"));
    let start = reneg::Pipeline::load(Path::new(SD15), DType::F32, &Device::Cpu)
        .unwrap()
        .encode("")
        .unwrap()
        .embeds
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (between, moved) = (max_diff(&on, &off), max_diff(&off, &start));
    println!("checkpointing on vs off: {between:e}; moved {moved:e}");
    // Measured: 2.7e-6 apart after moving 7.7e-3 (the recomputed blocks add their gradients
    // in another order, and AdamW's first steps divide by the gradient's own size).
    assert!(
        moved > 1e-3 && between < 3e-5,
        "on vs off {between:e}, moved {moved:e}"
    );
}

/// A run whose output is not a terminal (a log file, a Slurm job) still shows its progress:
/// plain lines on stdout with the step, the loss and reward, and the time left, at most every
/// 30 seconds (RENEG_PROGRESS_SECONDS; 0 here: a line at every step).
#[test]
fn train_progress_reaches_a_log() {
    let dir = tempdir("train-log");
    let run = |tag: &str, every: Option<&str>| -> String {
        let out = dir.join(tag);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reneg"));
        cmd.args(train_args(out.to_str().unwrap(), &["--steps", "3"]));
        match every {
            Some(s) => cmd.env("RENEG_PROGRESS_SECONDS", s),
            None => cmd.env_remove("RENEG_PROGRESS_SECONDS"),
        };
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let said = run("every-step", Some("0"));
    let lines: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("training step "))
        .collect();
    assert_eq!(lines.len(), 3, "{said}");
    for (k, l) in lines.iter().enumerate() {
        assert!(
            l.starts_with(&format!("training step {}/3 (loss ", k + 1))
                && l.contains(", reward ")
                && l.contains(" so far, "),
            "{l}"
        );
    }
    assert!(
        lines[0].ends_with("time left not known yet"),
        "{}",
        lines[0]
    );
    assert!(lines[2].ends_with("about 0s left"), "{}", lines[2]);
    // At the default interval a run of a few seconds writes none.
    let quiet = run("default", None);
    assert!(!quiet.contains("training step "), "{quiet}");
}

/// Training through another sampler's x0 prediction runs and records the sampler; the
/// paper's DDIM stays the default.
#[test]
fn train_takes_a_scheduler_and_records_it() {
    let dir = tempdir("train-sched");
    let out = dir.join("dpm");
    ok(&train_args(
        out.to_str().unwrap(),
        &["--steps", "1", "--scheduler", "dpm++2m-karras"],
    ));
    let written = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        written.contains("scheduler = \"dpm++2m-karras\""),
        "{written}"
    );
    let out = dir.join("default");
    ok(&train_args(out.to_str().unwrap(), &["--steps", "1"]));
    let written = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(written.contains("scheduler = \"ddim\""), "{written}");
    let a =
        reneg::embedding::NegativeEmbedding::load(&dir.join("dpm/embedding.safetensors")).unwrap();
    let b = reneg::embedding::NegativeEmbedding::load(&out.join("embedding.safetensors")).unwrap();
    assert_ne!(
        a.tensor.to_vec3::<f32>().unwrap(),
        b.tensor.to_vec3::<f32>().unwrap(),
        "the sampler made no difference to the gradient"
    );
}

/// Training through a ControlNet: the images take the control image's size, the config
/// records the ControlNet, and the learned embedding differs from training without it (the
/// gradient goes through the ControlNet; tests/train.rs checks its value against PyTorch).
#[test]
fn train_through_a_controlnet() {
    let case = PathBuf::from(repo!("tests/fixtures/parity/controlnet-sd15-tiny"));
    let dir = tempdir("train-cn");
    let run = |tag: &str, cn: bool| -> PathBuf {
        let out = dir.join(tag);
        let mut args: Vec<String> = [
            "train",
            "--model",
            case.join("pipeline").to_str().unwrap(),
            "--reward",
            "aesthetic",
            "--reward-model",
            repo!("tests/fixtures/parity/reward-aesthetic/reward"),
            "--prompts",
            repo!("tests/fixtures/train/train_prompts.txt"),
            "--batch-size",
            "1",
            "--sampling-steps",
            "3",
            "--grad-step-window",
            "2",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if cn {
            args.extend([
                "--controlnet".to_string(),
                case.join("pipeline/controlnet").display().to_string(),
                "--control-image".into(),
                case.join("control.png").display().to_string(),
                "--controlnet-scale".into(),
                "0.7".into(),
            ]);
        } else {
            args.extend(["--height", "32", "--width", "48"].map(String::from));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&refs);
        out
    };
    let with = run("with", true);
    let written = std::fs::read_to_string(with.join("config.toml")).unwrap();
    assert!(
        written.contains("controlnet = ")
            && written.contains("height = 32")
            && written.contains("width = 48"),
        "{written}"
    );
    let without = run("without", false);
    let a = reneg::embedding::NegativeEmbedding::load(&with.join("embedding.safetensors")).unwrap();
    let b =
        reneg::embedding::NegativeEmbedding::load(&without.join("embedding.safetensors")).unwrap();
    assert_ne!(
        a.tensor.to_vec3::<f32>().unwrap(),
        b.tensor.to_vec3::<f32>().unwrap(),
        "the ControlNet made no difference to training"
    );
}

#[test]
fn a_killed_training_run_leaves_a_readable_checkpoint_and_resumes() {
    let dir = tempdir("kill");
    let out = dir.join("run");
    let ckpt = out.join("checkpoint.safetensors");
    let args = train_args(
        out.to_str().unwrap(),
        &["--steps", "200", "--checkpoint-every", "1"],
    );
    for round in 0..3 {
        let mut a = args.clone();
        if round > 0 {
            a.push("--resume");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_reneg"))
            .args(&a)
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while !ckpt.is_file() && t0.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Let it write a few more checkpoints, then kill it wherever it is.
        std::thread::sleep(std::time::Duration::from_millis(700 + 130 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let c = reneg::train::checkpoint::Checkpoint::load(&ckpt)
            .expect("checkpoint readable after a kill");
        assert!(c.step >= 1);
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .map(|e| e.file_name())
        .collect();
    // A kill during a write may leave a temporary sibling, never a torn checkpoint.
    println!("temporary files after kills: {leftovers:?}");
}

#[test]
fn generate_adapts_per_sample_and_saves_the_embeddings() {
    let dir = tempdir("adapt");
    let out = dir.join("out");
    let saved = dir.join("adapted");
    let o = reneg(&gen_args(
        out.to_str().unwrap(),
        &[
            "--reward",
            "aesthetic",
            "--reward-model",
            repo!("tests/fixtures/parity/reward-aesthetic/reward"),
            "--adapt-steps",
            "3",
            "--adapt-lr",
            "0.05",
            "--save-adapted",
            saved.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let emb =
        reneg::embedding::NegativeEmbedding::load(&saved.join("00000-seed5.safetensors")).unwrap();
    let start: f64 = emb.metadata["reward_start"].parse().unwrap();
    let best: f64 = emb.metadata["reward_best"].parse().unwrap();
    // The kept best is never below the start by construction, so the bar is on the gain:
    // measured +1.82 (-0.473 to 1.344) in 3 steps on this tiny aesthetic head; an adaptation
    // that went nowhere or far less fails.
    assert!(best - start > 1.3, "{start} -> {best}");
    assert!(out.join("00000-seed5.png").is_file());
}

#[test]
fn train_bad_input_exits_2() {
    let dir = tempdir("train-bad");
    let out = dir.join("run");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let bad_toml = dir.join("bad.toml");
    std::fs::write(&bad_toml, "steps = \"many\"\n").unwrap();
    let o_str = out.to_str().unwrap();
    let mut empty_prompts = train_args(o_str, &[]);
    let i = empty_prompts
        .iter()
        .position(|a| *a == "--prompts")
        .unwrap();
    empty_prompts[i + 1] = empty.to_str().unwrap();
    for (args, needle) in [
        (empty_prompts, "no prompts"),
        (
            train_args(o_str, &["--config", bad_toml.to_str().unwrap()]),
            "bad.toml",
        ),
        (
            train_args(o_str, &["--micro-batch-size", "2"]),
            "micro_batch_size",
        ),
        (
            train_args(o_str, &["--init", "no/such/emb.safetensors"]),
            "no/such/emb.safetensors",
        ),
        (
            vec![
                "train",
                "--model",
                SD15,
                "--prompts",
                repo!("tests/fixtures/train/train_prompts.txt"),
                "--out",
                o_str,
            ],
            "reward",
        ),
    ] {
        let o = reneg(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

/// A single-file ControlNet (original layout: safetensors with control_model.* keys, or a
/// pickled .pth) draws the same image as its diffusers folder, given the folder's config
/// (the tiny model's head counts are not in its tensors).
#[test]
fn single_file_controlnets_draw_the_folders_image() {
    let case = PathBuf::from(repo!("tests/fixtures/parity/controlnet-sd2-tiny"));
    let folder = case.join("pipeline/controlnet");
    let dir = tempdir("cn-single");
    let run = |tag: &str, cn: &Path, config: bool| -> Vec<u8> {
        let out = dir.join(tag);
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            case.join("pipeline").display().to_string(),
            "--controlnet".into(),
            cn.display().to_string(),
            "--control-image".into(),
            case.join("control.png").display().to_string(),
            "--steps".into(),
            "3".into(),
            "--prompt".into(),
            "a red cube".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        if config {
            args.extend(["--controlnet-config".into(), folder.display().to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&refs);
        read_png(&out.join("00000-seed0.png")).0
    };
    let want = run("folder", &folder, false);
    let files = PathBuf::from(repo!("tests/fixtures/single_file_controlnet"));
    for f in [
        "controlnet-sd2-tiny-controlnet.safetensors",
        "controlnet-sd2-tiny-controlnet.pth",
    ] {
        assert_eq!(run(f, &files.join(f), true), want, "{f}");
    }
}
