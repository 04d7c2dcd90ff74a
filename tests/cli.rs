//! The `reneg` binary end to end, in temporary folders.

use std::path::PathBuf;
use std::process::Command;

const SD15: &str = "tests/fixtures/parity/sd15-tiny/pipeline";

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

#[test]
fn generate_writes_a_png_and_is_deterministic() {
    let dir = tempdir("gen");
    let out = dir.to_str().unwrap();
    let args = [
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
    let o = reneg(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let png = dir.join("0000-seed5.png");
    let first = std::fs::read(&png).unwrap();
    let img = image::load_from_memory(&first).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    let o = reneg(&args);
    assert!(o.status.success());
    assert_eq!(first, std::fs::read(&png).unwrap(), "same seed, same bytes");
    // A negative prompt changes the image.
    let mut neg = args.to_vec();
    neg.extend(["--negative-prompt", "blurry"]);
    let dir2 = tempdir("gen-neg");
    let last = neg.len() - 3;
    neg[last] = dir2.to_str().unwrap();
    let o = reneg(&neg);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(first, std::fs::read(dir2.join("0000-seed5.png")).unwrap());
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let empty = tempdir("empty");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", "--model", "no/such/dir", "--prompt", "x"],
            "no/such/dir",
        ),
        (
            vec![
                "generate",
                "--model",
                empty.to_str().unwrap(),
                "--prompt",
                "x",
            ],
            "model_index.json",
        ),
        (
            vec![
                "generate", "--model", SD15, "--prompt", "x", "--height", "30",
            ],
            "--height",
        ),
        (
            vec![
                "generate", "--model", SD15, "--prompt", "x", "--dtype", "bf16",
            ],
            "bf16",
        ),
    ];
    for (args, needle) in cases {
        let o = reneg(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn corrupt_weights_exit_2_naming_the_file() {
    let dir = tempdir("corrupt");
    let model = dir.join("model");
    copy_dir(&PathBuf::from(SD15), &model);
    std::fs::write(
        model.join("unet/diffusion_pytorch_model.safetensors"),
        b"garbage",
    )
    .unwrap();
    let o = reneg(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unet/diffusion_pytorch_model.safetensors"),
        "{}",
        stderr(&o)
    );
}

fn copy_dir(from: &PathBuf, to: &PathBuf) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}
