//! Interruption (issue 16): `train`, `eval` and `generate` are killed with SIGKILL at several
//! points, rerun (with `--resume` for train; eval resumes by itself; generate redoes its
//! images), and must end with the same final files as an uninterrupted run. After every kill,
//! every file the run has written must read back with the project's own readers: no
//! half-written file is ever seen.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SD15: &str = repo!("tests/fixtures/parity/sd15-tiny/pipeline");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-kill-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `args` to the end; returns what it printed.
fn run(args: &[String]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Starts `args`, kills it with SIGKILL after `after`, and waits for it. Returns whether it
/// was still running (a kill that came after the end tests nothing).
fn kill_after(args: &[String], after: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    running
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every file the run wrote reads back with the project's readers (temporary siblings of an
/// atomic write excepted: they are never read).
fn assert_readable(dir: &Path) {
    for f in files(dir) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name.contains(".tmp") {
            continue;
        }
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
        match (name.as_str(), ext) {
            ("checkpoint.safetensors", _) => {
                reneg::train::checkpoint::Checkpoint::load(&f).unwrap();
            }
            (_, "safetensors") | (_, "bin") => {
                reneg::embedding::NegativeEmbedding::load(&f).unwrap();
            }
            (_, "png") => {
                let decoder =
                    png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&f).unwrap()));
                let mut reader = decoder.read_info().unwrap();
                let mut buf = vec![0; reader.output_buffer_size().unwrap()];
                reader.next_frame(&mut buf).unwrap();
            }
            ("results.jsonl", _) => {
                reneg::eval::load_records(f.parent().unwrap()).unwrap();
            }
            (_, "json") => {
                serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&f).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
            _ => {}
        }
    }
}

/// The final files of two folders are equal, byte for byte (those named by `keep`).
fn assert_same(a: &Path, b: &Path, keep: impl Fn(&Path) -> bool) {
    let rel = |d: &Path| -> Vec<PathBuf> {
        files(d)
            .into_iter()
            .filter(|f| keep(f))
            .map(|f| f.strip_prefix(d).unwrap().to_path_buf())
            .collect()
    };
    let (ra, rb) = (rel(a), rel(b));
    assert_eq!(ra, rb, "the same files");
    assert!(!ra.is_empty());
    for r in ra {
        let (fa, fb) = (a.join(&r), b.join(&r));
        // Every file, embeddings and checkpoints included: their safetensors headers are
        // written in sorted order (io::sorted_header), so equal content is equal bytes.
        let same = std::fs::read(&fa).unwrap() == std::fs::read(&fb).unwrap();
        assert!(same, "{} differs", r.display());
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn killed_train_resumes_to_the_uninterrupted_embedding() {
    let d = tempdir("train");
    let args = |out: &Path| {
        strings(&[
            "train",
            "--model",
            SD15,
            "--reward",
            "aesthetic",
            "--reward-model",
            AESTHETIC,
            "--prompts",
            repo!("tests/fixtures/train/train_prompts.txt"),
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
            "--steps",
            "40",
            "--checkpoint-every",
            "3",
            "--out",
            &s(out),
        ])
    };
    let whole = d.join("whole");
    run(&args(&whole));
    let cut = d.join("cut");
    let mut kills = 0;
    for (i, ms) in [150, 400, 700, 1000].into_iter().enumerate() {
        let mut a = args(&cut);
        if i > 0 {
            a.push("--resume".into());
        }
        kills += usize::from(kill_after(&a, Duration::from_millis(ms)));
        assert_readable(&cut);
    }
    // The last resume continues the last checkpoint: it says so, and the metrics of the steps
    // before it stay as written (each line holds its step's wall time, so a run that
    // restarted from step 0 would rewrite them with other times).
    let at = reneg::train::checkpoint::Checkpoint::load(&cut.join("checkpoint.safetensors"))
        .unwrap()
        .step;
    let metric_lines = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    let before = metric_lines(&cut);
    let mut a = args(&cut);
    a.push("--resume".into());
    let said = run(&a);
    println!("train: {kills} kill(s) landed while running; the last resume at step {at}");
    assert!(kills >= 2, "the kills came too late to test anything");
    assert!(at > 0 && at < 40, "checkpoint step {at}");
    assert!(
        said.contains(&format!("resumed at step {at}")),
        "the resumed run began elsewhere than step {at}: {said}"
    );
    assert_eq!(
        metric_lines(&cut)[..at as usize],
        before[..at as usize],
        "the steps before the checkpoint were run again"
    );
    let finals = |f: &Path| {
        let n = f.file_name().unwrap().to_string_lossy();
        n == "embedding.safetensors" || n == "embedding.bin" || n == "metrics.jsonl"
    };
    // metrics.jsonl holds seconds per step, which differ: compare its steps and losses.
    assert_same(&whole, &cut, |f| finals(f) && !f.ends_with("metrics.jsonl"));
    let losses = |dir: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(losses(&whole), losses(&cut));
}

#[test]
fn killed_eval_resumes_to_the_uninterrupted_report() {
    let d = tempdir("eval");
    let prompts = d.join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red cube on a table\na blue ball\na green tree\na cat on a sofa\n",
    )
    .unwrap();
    let args = |out: &Path| {
        strings(&[
            "eval",
            "--model",
            SD15,
            "--prompts",
            &s(&prompts),
            "--seeds",
            "2",
            "--negative",
            "null",
            "--negative",
            "prompt:blurry",
            "--reward",
            "aesthetic",
            "--reward-model",
            AESTHETIC,
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--out",
            &s(out),
        ])
    };
    let whole = d.join("whole");
    run(&args(&whole));
    let cut = d.join("cut");
    let mut kills = 0;
    for ms in [150, 350, 600, 900] {
        kills += usize::from(kill_after(&args(&cut), Duration::from_millis(ms)));
        assert_readable(&cut);
    }
    run(&args(&cut));
    println!("eval: {kills} kill(s) landed while running");
    assert!(kills >= 2, "the kills came too late to test anything");
    assert_same(&whole, &cut, |f| {
        let n = f.file_name().unwrap().to_string_lossy();
        n.ends_with(".png") || n == "report.json"
    });
    // The records: the same set (a resumed run appends in another order).
    let mut a = reneg::eval::load_records(&whole).unwrap();
    let mut b = reneg::eval::load_records(&cut).unwrap();
    let key = |r: &reneg::eval::Record| r.key();
    a.sort_by_key(key);
    b.sort_by_key(key);
    b.dedup_by_key(|r| r.key());
    assert_eq!(a, b);
}

#[test]
fn killed_generate_reruns_to_the_same_images() {
    let d = tempdir("generate");
    let prompts = d.join("prompts.txt");
    let lines: String = (0..8).map(|i| format!("a red cube number {i}\n")).collect();
    std::fs::write(&prompts, lines).unwrap();
    let args = |out: &Path| {
        strings(&[
            "generate",
            "--model",
            SD15,
            "--prompts",
            &s(&prompts),
            "--steps",
            "4",
            "--height",
            "32",
            "--width",
            "32",
            "--out",
            &s(out),
        ])
    };
    let whole = d.join("whole");
    run(&args(&whole));
    let cut = d.join("cut");
    let mut kills = 0;
    for ms in [100, 250, 400] {
        kills += usize::from(kill_after(&args(&cut), Duration::from_millis(ms)));
        assert_readable(&cut);
    }
    run(&args(&cut));
    println!("generate: {kills} kill(s) landed while running");
    assert!(kills >= 1, "the kills came too late to test anything");
    assert_same(&whole, &cut, |f| f.extension().is_some_and(|e| e == "png"));
}
