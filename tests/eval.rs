//! `reneg eval` end to end on the tiny SD1.5 pipeline with two tiny rewards: the report's
//! sanity, sharded runs merged equal to the unsharded run, resume, and bad input.

use reneg::eval::report::Report;
use reneg::eval::Record;
use std::path::{Path, PathBuf};
use std::process::Command;

const SD15: &str = "tests/fixtures/parity/sd15-tiny/pipeline";
const AESTHETIC: &str = "tests/fixtures/parity/reward-aesthetic/reward";
const CLIP: &str = "tests/fixtures/parity/reward-hfclip/reward";

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
        assert!(s.ci95[0] <= s.mean && s.mean <= s.ci95[1], "{row:?}");
        assert!(s.delta_ci95[0] <= s.delta_vs_first && s.delta_vs_first <= s.delta_ci95[1]);
        assert_eq!(s.n, 6);
        match (row.negative.as_str(), s.win_rate_vs_first) {
            ("null", w) => assert_eq!(w, None),
            (_, Some(w)) => assert!((0.0..=1.0).contains(&w)),
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
    assert_eq!((grid.width, grid.height), (4 + 2 * 36, 4 + 3 * 36));

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

/// A per-sample negative starting from the null-text embedding never scores below null text
/// on the reward it adapts to (same noise; the adaptation keeps its start as a candidate).
#[test]
fn eval_per_sample_is_not_below_its_start() {
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
    let out = dir.join("out");
    let per_sample = format!("per-sample:{}", null.display());
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
        "2",
        "--adapt-lr",
        "0.05",
        "--out",
        out.to_str().unwrap(),
    ]);
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    for pair in recs.chunks(2) {
        let (null, adapted) = (&pair[0], &pair[1]);
        assert_eq!((null.negative, adapted.negative), (0, 1));
        assert!(adapted.score >= null.score - 1e-6, "{null:?} {adapted:?}");
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
    // No --model: the built-in miniature world.
    let default_out = dir.join("default-model");
    let o = reneg(&[
        "eval",
        "--prompt",
        "a small red circle in the centre, on a grey background",
        "--negative",
        "null",
        "--reward",
        "judge-quality",
        "--reward-model",
        reneg::mini::default_root().join("judge").to_str().unwrap(),
        "--steps",
        "2",
        "--out",
        default_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = std::fs::read_to_string(default_out.join("eval.json")).unwrap();
    assert!(manifest.contains("assets/mini/pipeline"), "{manifest}");
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
