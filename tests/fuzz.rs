//! A CI-sized fuzz run (issue 16) of every parser that reads a user's file: mutated real files
//! must give errors, never panics. The long run is `cargo run --release --example fuzz`.

#[path = "../examples/fuzz/targets.rs"]
mod targets;

#[test]
fn every_parser_survives_mutated_inputs() {
    let scratch = std::env::temp_dir().join(format!("reneg-fuzz-test-{}", std::process::id()));
    let all = targets::targets();
    assert!(all.len() >= 20, "{} targets", all.len());
    let (n, crashes) = targets::run_all(&all, 1000, 7, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    println!("fuzz: {n} executions over {} targets", all.len());
    let report: Vec<String> = crashes
        .iter()
        .map(|c| {
            format!(
                "{}: {} ({} input bytes)",
                c.target,
                c.message,
                c.input.len()
            )
        })
        .collect();
    assert!(
        crashes.is_empty(),
        "{} crash(es):\n{}",
        crashes.len(),
        report.join("\n")
    );
}
