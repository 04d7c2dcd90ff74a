//! The runs as library functions (issue 30): a program other than the CLI builds a plan,
//! drives the run, and sees its progress through `reneg::run::Progress`.

use candle_core::{DType, Device};
use reneg::prompts::Prompt;
use reneg::run::generate::{generate, GeneratePlan, Negative};
use reneg::run::model::ModelPlan;
use reneg::run::Progress;
use std::path::PathBuf;

const SD15: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/parity/sd15-tiny/pipeline"
);

/// Every event, in order.
#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    advanced: u64,
}

impl Progress for Recorder {
    fn begin(&mut self, total: u64, unit: &str) {
        self.events.push(format!("begin {total} {unit}"));
    }
    fn advance(&mut self, n: u64) {
        self.advanced += n;
    }
    fn status(&mut self, msg: &str) {
        self.events.push(format!("status {msg}"));
    }
    fn note(&mut self, line: &str) {
        self.events.push(format!("note {line}"));
    }
    fn finish(&mut self) {
        self.events.push("finish".into());
    }
}

fn plan(out: PathBuf) -> GeneratePlan {
    let prompt = |t: &str| Prompt {
        text: t.into(),
        ..Default::default()
    };
    let mut provenance = serde_json::Map::new();
    provenance.insert("caller".into(), "a test".into());
    GeneratePlan {
        prompts: vec![prompt("a red cube"), prompt("a blue ball")],
        negative: Negative::Prompt("blurry".into()),
        steps: 3,
        guidance_scale: 5.0,
        seed: 7,
        height: 32,
        width: 32,
        images_per_prompt: 1,
        batch_size: 2,
        frames: None,
        fps: 8,
        sizes: Default::default(),
        init_latents: None,
        adapt: None,
        out,
        model: "sd15-tiny".into(),
        parameters_suffix: String::new(),
        provenance,
    }
}

#[test]
fn a_program_plans_generates_and_sees_the_progress() {
    let out = std::env::temp_dir().join(format!("reneg-runs-gen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // The plan is plain data: what is written reads back the same.
    let text = serde_json::to_string(&plan(out.clone())).unwrap();
    let plan: GeneratePlan = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_string(&plan).unwrap(), text);

    let mut sd = ModelPlan::of(SD15).load(DType::F32, &Device::Cpu).unwrap();
    let mut progress = Recorder::default();
    let records = generate(&mut sd, &plan, None, &mut progress).unwrap();

    // Two images of three steps each, in one batch of two: six sampling steps.
    assert_eq!(progress.events.first().unwrap(), "begin 6 sampling step");
    assert_eq!(progress.advanced, 6);
    assert_eq!(progress.events.last().unwrap(), "finish");
    assert_eq!(records.len(), 2);
    for (i, r) in records.iter().enumerate() {
        let file = out.join(r["file"].as_str().unwrap());
        assert!(file.is_file(), "{}", file.display());
        assert!(progress
            .events
            .contains(&format!("note {}", file.display())));
        assert_eq!(r["seed"], 7 + i as u64);
        assert_eq!(r["negative"], "blurry");
        assert_eq!(
            r["caller"], "a test",
            "the caller's provenance is in every record"
        );
    }
    let lines = std::fs::read_to_string(out.join("images.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    // The plan is written beside what it made, and reads back as the plan that ran.
    let written = std::fs::read_to_string(out.join(reneg::run::generate::PLAN)).unwrap();
    let back: GeneratePlan = serde_json::from_str(&written).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
}

#[test]
fn a_plan_no_run_could_use_is_refused_before_anything_is_written() {
    let out = std::env::temp_dir().join(format!("reneg-runs-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut sd = ModelPlan::of(SD15).load(DType::F32, &Device::Cpu).unwrap();
    let mut bad = plan(out.clone());
    bad.batch_size = 0;
    let err = generate(&mut sd, &bad, None, &mut reneg::run::Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--batch-size"), "{err}");
    let mut bad = plan(out.clone());
    bad.negative = Negative::Embedding(PathBuf::from("no-such-negative.safetensors"));
    let err = generate(&mut sd, &bad, None, &mut reneg::run::Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-negative.safetensors"), "{err}");
    assert!(!out.exists(), "nothing is written for a refused plan");
}
