//! `reneg eval` end to end on the tiny SD1.5 pipeline with two tiny rewards: the report's
//! sanity, sharded runs merged equal to the unsharded run, resume, and bad input.

/// A path under the repository root (the tests run in this crate's folder).
macro_rules! repo {
    ($p:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)
    };
}

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::files_under;

use reneg::eval::report::Report;
use reneg::eval::Record;
use std::path::{Path, PathBuf};
use std::process::Command;

const SD15: &str = repo!("tests/fixtures/parity/sd15-tiny/pipeline");
const AESTHETIC: &str = repo!("tests/fixtures/parity/reward-aesthetic/reward");
const CLIP: &str = repo!("tests/fixtures/parity/reward-hfclip/reward");

fn reneg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = reneg(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-eval-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// PartiPrompts-style TSV: 3 prompts in 2 categories.
fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.tsv");
    std::fs::write(
        &p,
        "Prompt\tCategory\tChallenge\na red cube on a table\tArtifacts\tBasic\na blue sphere\tArtifacts\tBasic\na cat in the snow\tAnimals\tBasic\n",
    )
    .unwrap();
    p
}

fn eval_args(tsv: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "eval",
        "--model",
        SD15,
        "--prompts",
        tsv.to_str().unwrap(),
        "--seeds",
        "2",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--negative",
        "null",
        "--negative",
        "handcrafted",
        "--reward",
        "aesthetic",
        "--reward-model",
        AESTHETIC,
        "--reward",
        "clip",
        "--reward-model",
        CLIP,
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_eval(tsv: &Path, out: &Path, extra: &[&str]) -> String {
    let args = eval_args(tsv, out, extra);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn report(dir: &Path) -> Report {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn records(dir: &Path) -> Vec<Record> {
    let mut r = reneg::eval::load_records(dir).unwrap();
    r.sort_by_key(|r| r.key());
    r
}

#[test]
fn eval_reports_shards_merge_and_resume() {
    let dir = tempdir("main");
    let tsv = prompts(&dir);
    let full = dir.join("full");
    let stdout = run_eval(&tsv, &full, &[]);
    assert!(stdout.contains("report.md"), "{stdout}");

    // One line per image and reward: 3 prompts x 2 seeds x 2 negatives x 2 rewards.
    let recs = records(&full);
    assert_eq!(recs.len(), 24);
    for r in &recs {
        assert!(full.join(&r.image).is_file(), "{}", r.image);
        assert!(r.score.is_finite());
    }
    // Paired: the same unit's images differ between negatives (the negative matters) but
    // every negative's image of a unit starts from the same noise (checked via determinism
    // below: the shards reproduce the same scores).
    let r = report(&full);
    assert_eq!((r.units_planned, r.units_complete), (6, 6));
    assert_eq!(r.results.len(), 4);
    for row in &r.results {
        let s = &row.summary;
        assert_eq!(s.n, 6);
        // The win rate counted by hand from the records of this negative and of null text.
        let of = |neg: usize| -> Vec<f64> {
            let mut v: Vec<(usize, u64, f64)> = recs
                .iter()
                .filter(|x| x.negative == neg && x.reward == row.reward)
                .map(|x| (x.prompt_index, x.seed, x.score))
                .collect();
            v.sort_by_key(|&(p, s, _)| (p, s));
            v.into_iter().map(|(_, _, score)| score).collect()
        };
        let neg = recs
            .iter()
            .find(|x| x.negative_label == row.negative)
            .map(|x| x.negative)
            .unwrap();
        let (mine, null) = (of(neg), of(0));
        let wins: f64 = mine
            .iter()
            .zip(&null)
            .map(|(a, b)| {
                if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                }
            })
            .sum();
        match (row.negative.as_str(), s.win_rate_vs_first) {
            ("null", w) => assert_eq!(w, None),
            (_, Some(w)) => assert_eq!(w, wins / 6.0, "{}", row.negative),
            (n, None) => panic!("{n}: no win rate"),
        }
    }
    // The mean in the report is the mean of the records.
    let null_aesthetic: Vec<f64> = recs
        .iter()
        .filter(|r| r.negative == 0 && r.reward == "aesthetic")
        .map(|r| r.score)
        .collect();
    let mean = null_aesthetic.iter().sum::<f64>() / null_aesthetic.len() as f64;
    let row = r
        .results
        .iter()
        .find(|x| x.negative == "null" && x.reward == "aesthetic")
        .unwrap();
    assert!((row.summary.mean - mean).abs() < 1e-12);
    // Categories of the TSV, with their unit counts.
    let cats: std::collections::BTreeSet<_> =
        r.categories.iter().map(|c| c.category.as_str()).collect();
    assert_eq!(cats, ["Animals", "Artifacts"].into_iter().collect());
    assert!(r
        .categories
        .iter()
        .all(|c| c.n == if c.category == "Animals" { 2 } else { 4 }));
    let md = std::fs::read_to_string(full.join("report.md")).unwrap();
    assert!(md.contains("Artifacts") && md.contains("handcrafted") && md.contains("win rate"));
    assert!(full.join("chart.png").is_file());
    assert_eq!(r.grids, vec!["grids/grid_00.png".to_string()]);
    let grid = reneg::io::read_png(&full.join("grids/grid_00.png")).unwrap();
    // The prompts' label column (180 px) and two 32 px cells with their gaps; three rows of
    // cells under a header band (the legend of the columns and their numbers).
    assert_eq!(grid.width, 180 + 4 + 2 * 36);
    assert!(grid.height >= 4 + 3 * 36 + 2 * 17, "{}", grid.height);

    // Two shards, merged, give the unsharded report and records.
    let (s0, s1, merged) = (dir.join("s0"), dir.join("s1"), dir.join("merged"));
    run_eval(&tsv, &s0, &["--shard", "0/2"]);
    run_eval(&tsv, &s1, &["--shard", "1/2"]);
    assert_eq!(records(&s0).len() + records(&s1).len(), 24);
    assert_eq!(report(&s0).units_complete, 3);
    ok(&[
        "eval",
        "merge",
        s0.to_str().unwrap(),
        s1.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(records(&merged), recs);
    assert_eq!(report(&merged), r);
    assert_eq!(
        std::fs::read(merged.join("grids/grid_00.png")).unwrap(),
        std::fs::read(full.join("grids/grid_00.png")).unwrap()
    );

    // Resume: drop the last unit's records (and leave half a line, as a kill would); the
    // rerun redoes only those images, leaves the others untouched, and ends where it was.
    let results = full.join("results.jsonl");
    let text = std::fs::read_to_string(&results).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines[..lines.len() - 2].join("\n") + "\n" + &lines[lines.len() - 2][..10];
    std::fs::write(&results, kept).unwrap();
    let untouched = full.join(&recs[0].image);
    let before = std::fs::metadata(&untouched).unwrap().modified().unwrap();
    let stdout = run_eval(&tsv, &full, &[]);
    let after = std::fs::metadata(&untouched).unwrap().modified().unwrap();
    assert_eq!(before, after, "a finished image was redone");
    assert_eq!(records(&full), recs);
    assert_eq!(report(&full), r);
    assert!(stdout.contains("6/6"), "{stdout}");
    // A finished run reruns to the same report without new records.
    run_eval(&tsv, &full, &[]);
    assert_eq!(records(&full).len(), 24);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A per-sample negative starting from the null-text embedding starts from null text's image
/// (same noise) and raises the reward it adapts to on every prompt. Measured gains on this
/// tiny model's aesthetic score (2 steps, lr 0.05): 1.32 and 1.74; the bar is 1.0, so an
/// adaptation that went nowhere (or kept its start: gain 0) or climbed far less fails.
#[test]
fn eval_per_sample_raises_the_reward_it_adapts_to() {
    let dir = tempdir("per-sample");
    let null = dir.join("null.safetensors");
    ok(&[
        "embedding",
        "encode",
        "--model",
        SD15,
        "--out",
        null.to_str().unwrap(),
    ]);
    let per_sample = format!("per-sample:{}", null.display());
    let run = |steps: &str, lr: &str| {
        let out = dir.join(format!("out-{steps}-{lr}"));
        ok(&[
            "eval",
            "--model",
            SD15,
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
            &per_sample,
            "--reward",
            "aesthetic",
            "--reward-model",
            AESTHETIC,
            "--adapt-steps",
            steps,
            "--adapt-lr",
            lr,
            "--out",
            out.to_str().unwrap(),
        ]);
        let recs = records(&out);
        assert_eq!(recs.len(), 4);
        recs
    };
    for pair in run("2", "0.05").chunks(2) {
        let (null, adapted) = (&pair[0], &pair[1]);
        assert_eq!((null.negative, adapted.negative), (0, 1));
        assert!(adapted.score - null.score > 1.0, "{null:?} {adapted:?}");
    }
    // With a zero learning rate the adaptation cannot move: its image is null text's, from
    // the same noise, so the scores agree (another seed or noise would not).
    for pair in run("2", "0").chunks(2) {
        let (null, adapted) = (&pair[0], &pair[1]);
        assert!(
            (adapted.score - null.score).abs() < 1e-6,
            "{null:?} {adapted:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_bad_input_exits_2_with_one_line() {
    let dir = tempdir("bad");
    let tsv = prompts(&dir);
    let out = dir.join("out");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            eval_args(&tsv, &out, &["--negative", "nonsense"]),
            "unknown negative",
        ),
        (
            eval_args(&tsv, &out, &["--negative", "missing/emb.safetensors"]),
            "not found",
        ),
        (
            eval_args(&tsv, &out, &["--negative", "per-sample:missing.bin"]),
            "not found",
        ),
        (eval_args(&tsv, &out, &["--shard", "2/2"]), "--shard 2/2"),
        (eval_args(&tsv, &out, &["--shard", "x"]), "--shard x"),
        (eval_args(&tsv, &out, &["--limit", "0"]), "no prompts"),
        (eval_args(&empty, &out, &[]), "contains no prompts"),
    ];
    for (args, needle) in cases {
        let o = reneg(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // No --model: the built-in miniature world, embedded in the binary and written to the data
    // dir on first use; run from a folder holding a stray `assets/mini` that must not be used.
    let default_out = dir.join("default-model");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("assets/mini/pipeline")).unwrap();
    std::fs::write(
        elsewhere.join("assets/mini/pipeline/model_index.json"),
        "stray",
    )
    .unwrap();
    let data = dir.join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .current_dir(&elsewhere)
        .env("RENEG_DATA_DIR", &data)
        .env_remove("RENEG_MINI")
        .args([
            "eval",
            "--prompt",
            "a small red circle in the centre, on a grey background",
            "--negative",
            "null",
            "--reward",
            "judge-quality",
            "--reward-model",
            reneg_mini::default_root().join("judge").to_str().unwrap(),
            "--steps",
            "2",
            "--out",
            default_out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("model: ")
            && first.contains(data.to_str().unwrap())
            && first.ends_with("/pipeline"),
        "the first line names the built-in model: {stdout}"
    );
    let manifest = std::fs::read_to_string(default_out.join("eval.json")).unwrap();
    assert!(manifest.contains("mini-"), "{manifest}");
    // The written world is the committed one, file for file: every file of assets/mini but the
    // experiment's outputs, byte for byte, and nothing else.
    let written = Path::new(first.trim_start_matches("model: "))
        .parent()
        .unwrap();
    let committed = reneg_mini::default_root();
    let world = |root: &Path| -> Vec<String> {
        let mut v: Vec<String> = files_under(root)
            .into_iter()
            .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .filter(|r| !r.starts_with("experiment/") && !r.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let names = world(&committed);
    assert!(names.contains(&"pipeline/unet/diffusion_pytorch_model.safetensors".to_string()));
    assert_eq!(world(written), names);
    for f in &names {
        let a = std::fs::read(written.join(f)).unwrap();
        let b = std::fs::read(committed.join(f)).unwrap();
        assert!(a == b, "{f} differs from assets/mini");
    }
    // Merging a folder that is not an eval output.
    let o = reneg(&[
        "eval",
        "merge",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The paired bootstrap and the win rates against an independent implementation of the same
/// method (tools/gen_stats_fixture.py, plain Python written from the method's definition; its
/// hand case is also checked by hand there), including intervals that miss their estimate.
#[test]
fn bootstrap_and_win_rates_match_the_independent_reference() {
    use reneg::eval::stats::summarize;
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo!("tests/fixtures/eval/stats.json")).unwrap(),
    )
    .unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
    let num = |v: &serde_json::Value| v.as_f64().unwrap();
    for (name, case) in fixture.as_object().unwrap() {
        let scores: Vec<Vec<f64>> = case["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(num).collect())
            .collect();
        let got = summarize(&scores);
        let want = case["summaries"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            let pairs = [
                ("mean", g.mean, num(&w["mean"])),
                ("ci low", g.ci95[0], num(&w["ci95"][0])),
                ("ci high", g.ci95[1], num(&w["ci95"][1])),
                ("delta", g.delta_vs_first, num(&w["delta_vs_first"])),
                ("delta low", g.delta_ci95[0], num(&w["delta_ci95"][0])),
                ("delta high", g.delta_ci95[1], num(&w["delta_ci95"][1])),
            ];
            for (what, a, b) in pairs {
                assert!(close(a, b), "{name} negative {j} {what}: {a} vs {b}");
            }
            assert_eq!(
                g.win_rate_vs_first,
                w["win_rate_vs_first"].as_f64(),
                "{name} {j}"
            );
            assert_eq!(g.n, w["n"].as_u64().unwrap() as usize);
        }
    }
    // The hand case, by hand: means 2, 3, 2; win rates 1 and 0.5.
    let hand = summarize(&[
        vec![1.0, 2.0, 3.0],
        vec![2.0, 3.0, 4.0],
        vec![0.0, 2.0, 4.0],
    ]);
    let means: Vec<f64> = hand.iter().map(|s| s.mean).collect();
    assert_eq!(means, [2.0, 3.0, 2.0]);
    let wins: Vec<Option<f64>> = hand.iter().map(|s| s.win_rate_vs_first).collect();
    assert_eq!(wins, [None, Some(1.0), Some(0.5)]);
}

/// A reward that returned NaN: the record is written (as null), read back by resume and merge,
/// counted in the report, and its unit left out of that reward's paired statistics.
#[test]
fn nan_scores_are_recorded_counted_and_do_not_break_later_runs() {
    use reneg::eval::{append_records, load_records, report::build, Manifest};
    use reneg::prompts::Prompt;
    let dir = tempdir("nan");
    let m = Manifest {
        frames: None,
        model: "m".into(),
        prompts: vec![
            Prompt {
                text: "a".into(),
                category: None,
                control_image: None,
            },
            Prompt {
                text: "b".into(),
                category: None,
                control_image: None,
            },
        ],
        seeds: 2,
        base_seed: 0,
        steps: 1,
        guidance_scale: 1.0,
        height: 8,
        width: 8,
        negatives: vec!["null".into(), "x".into()],
        rewards: vec!["r".into()],
        adapt: None,
        roles: Default::default(),
        model_options: vec![],
        precision: "f32".into(),
        device: "cpu".into(),
        sampler: "DDIM".into(),
        files: vec![],
    };
    let mut recs = vec![];
    for p in 0..2 {
        for seed in 0..2u64 {
            for neg in 0..2 {
                let score = match (p, seed, neg) {
                    (1, 1, 1) => f64::NAN,
                    _ => (p * 4 + seed as usize * 2 + neg) as f64,
                };
                recs.push(Record {
                    prompt_index: p,
                    seed,
                    negative: neg,
                    negative_label: m.negatives[neg].clone(),
                    reward: "r".into(),
                    score,
                    image: Manifest::image_path(neg, p, seed).display().to_string(),
                    prompt: m.prompts[p].text.clone(),
                    category: None,
                });
            }
        }
    }
    append_records(&dir, &recs).unwrap();
    let text = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    assert!(text.contains("\"score\":null"), "{text}");
    let back = load_records(&dir).unwrap();
    assert_eq!(back.len(), 8);
    assert!(back.iter().filter(|r| r.score.is_nan()).count() == 1);
    let r = build(&m, back);
    assert_eq!(r.units_complete, 4);
    let rows: Vec<(usize, usize, f64)> = r
        .results
        .iter()
        .map(|row| (row.non_finite, row.summary.n, row.summary.mean))
        .collect();
    // Units (0,0), (0,1), (1,0) remain: null scores 0, 2, 4 (mean 2), x scores 1, 3, 5 (mean 3).
    assert_eq!(rows, [(0, 3, 2.0), (1, 3, 3.0)]);
    let md = reneg::eval::report::markdown(&r, &m);
    assert!(
        md.contains("1 score(s) of this reward are not finite"),
        "{md}"
    );
}

/// An image path edited to leave the folder (`..`, absolute) is refused when the records are
/// read, so `eval merge` and the report never read or write outside their folders.
#[test]
fn records_whose_image_path_leaves_the_folder_are_refused() {
    for bad in [
        "../../outside.png",
        "/tmp/outside.png",
        "images/n00/00000-seed0.png/../../x",
    ] {
        let dir = tempdir("traversal");
        let line = serde_json::json!({"prompt_index": 0, "seed": 0, "negative": 0,
            "negative_label": "null", "reward": "r", "score": 1.0, "image": bad,
            "prompt": "a", "category": null});
        std::fs::write(dir.join("results.jsonl"), format!("{line}\n")).unwrap();
        let err = reneg::eval::load_records(&dir).unwrap_err().to_string();
        assert!(
            err.contains("results.jsonl") && err.contains("not this record's image"),
            "{err}"
        );
    }
}

/// An evaluation resumed with anything that changes its images or scores would mix two runs
/// in one report: each setting (the model's LoRA, textual inversion, VAE, clip skip and prompt
/// syntax, the precision, the sampler, its eta and the guidance rescale) and the content of each file it read under
/// the same path (a reward model, a negative's embedding) is recorded, and a rerun that differs
/// is refused, saying what differs. The same settings resume.
#[test]
fn resuming_with_other_settings_is_refused() {
    let dir = tempdir("options");
    let tsv = prompts(&dir);
    let out = dir.join("out");
    // Files whose content changes under the same path.
    let reward = dir.join("reward");
    common::copy_dir(Path::new(AESTHETIC), &reward);
    let negative = dir.join("negative.safetensors");
    let encode = |text: &str| {
        ok(&[
            "embedding",
            "encode",
            "--model",
            SD15,
            "--text",
            text,
            "--out",
            negative.to_str().unwrap(),
        ]);
    };
    encode("blurry");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "--model",
            SD15,
            "--prompts",
            tsv.to_str().unwrap(),
            "--limit",
            "1",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--negative",
            "null",
            "--negative",
            negative.to_str().unwrap(),
            "--reward",
            "aesthetic",
            "--reward-model",
            reward.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| reneg(&args(extra).iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let refused = |what: &str, o: std::process::Output, says: &str| {
        assert_eq!(o.status.code(), Some(2), "{what}: resumed");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("other settings") && err.contains(says),
            "{what}: wanted {says:?} in {err}"
        );
    };
    let ti = repo!("tests/fixtures/ti/tinyneg.pt");
    let vae = format!("{SD15}/vae");
    for (extra, says) in [
        (vec!["--clip-skip", "1"], "clip_skip=1"),
        (vec!["--prompt-syntax", "a1111"], "prompt_syntax=a1111"),
        (
            vec!["--lora", repo!("tests/fixtures/lora/kohya.safetensors")],
            "lora",
        ),
        (vec!["--embedding", ti], "textual inversion"),
        (vec!["--vae", &vae], "vae"),
        (vec!["--precision", "fp16"], "precision \"f32\" -> \"fp16\""),
        (vec!["--scheduler", "euler"], "sampler"),
        (vec!["--eta", "0.5"], "eta"),
        (vec!["--guidance-rescale", "0.7"], "guidance_rescale=0.7"),
    ] {
        refused(&format!("{extra:?}"), run(&extra), says);
    }
    // Other content under the same paths: a retrained reward model, a re-encoded negative.
    let head = reward.join("head.safetensors");
    let original = std::fs::read(&head).unwrap();
    let mut tensors = candle_core::safetensors::load(&head, &candle_core::Device::Cpu).unwrap();
    for t in tensors.values_mut() {
        *t = (&*t * 2.0).unwrap();
    }
    candle_core::safetensors::save(&tensors, &head).unwrap();
    refused(
        "reward model changed",
        run(&[]),
        "the content of reward model",
    );
    std::fs::write(&head, original).unwrap();
    encode("a painting");
    refused("negative changed", run(&[]), "the content of negative");
    encode("blurry");
    // The same settings and files resume (nothing left to do, nothing written again).
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).unwrap(),
        results
    );
    let manifest = std::fs::read_to_string(out.join("eval.json")).unwrap();
    for key in [
        "\"precision\": \"f32\"",
        "\"device\": \"cpu\"",
        "\"sha256\"",
        "\"sampler\"",
    ] {
        assert!(manifest.contains(key), "{key} not in {manifest}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// ControlNet evaluation with each prompt's own control image from a `.jsonl` prompt file
/// (paths relative to it): the same prompt and seed under two control images gives two
/// images, under the same control image the same one; the manifest records the images.
#[test]
fn eval_takes_each_prompts_control_image_from_the_prompt_file() {
    const CN: &str = repo!("tests/fixtures/parity/controlnet-sd15-tiny");
    let dir = tempdir("control");
    let a = reneg::io::read_png(Path::new(&format!("{CN}/control.png"))).unwrap();
    reneg::io::write_png(&a, &dir.join("a.png"), None).unwrap();
    let flipped = reneg::io::Rgb {
        width: a.width,
        height: a.height,
        data: a.data.chunks(3).rev().flatten().copied().collect(),
    };
    reneg::io::write_png(&flipped, &dir.join("b.png"), None).unwrap();
    let run = |tag: &str, second: &str| -> PathBuf {
        let list = dir.join(format!("{tag}.jsonl"));
        std::fs::write(
            &list,
            format!(
                "{{\"prompt\": \"a red cube\", \"control_image\": \"a.png\"}}\n{{\"prompt\": \"a red cube\", \"category\": \"Shapes\", \"control_image\": \"{second}\"}}\n"
            ),
        )
        .unwrap();
        let out = dir.join(tag);
        ok(&[
            "eval",
            "--model",
            &format!("{CN}/pipeline"),
            "--controlnet",
            &format!("{CN}/pipeline/controlnet"),
            "--controlnet-scale",
            "0.7",
            "--prompts",
            list.to_str().unwrap(),
            "--seeds",
            "1",
            "--steps",
            "3",
            "--negative",
            "null",
            "--reward",
            "aesthetic",
            "--reward-model",
            AESTHETIC,
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    };
    let png = |out: &Path, p: usize| {
        std::fs::read(out.join(reneg::eval::Manifest::image_path(0, p, 0))).unwrap()
    };
    let two = run("two", "b.png");
    assert_ne!(
        png(&two, 0),
        png(&two, 1),
        "the second prompt's control image was not used"
    );
    let same = run("same", "a.png");
    assert_eq!(png(&same, 0), png(&same, 1));
    assert_eq!(png(&same, 0), png(&two, 0));
    let manifest = std::fs::read_to_string(two.join("eval.json")).unwrap();
    assert!(
        manifest.contains("b.png") && manifest.contains("controlnet="),
        "{manifest}"
    );
}
