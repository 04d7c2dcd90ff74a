//! A CI-sized fuzz run (issue 16) of every parser that reads a user's file: mutated real files
//! must give errors, never panics, and what a parser accepts must keep its properties (written
//! back, it reads back equal; timesteps in range and in order). Each parser's real files must
//! parse, and the refused ones be refused, so a parser that refused everything fails. The long
//! run is `cargo run --release --example fuzz`.

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

/// Catches a parser that refuses valid files (the mutated run alone would pass it): every
/// target's real seeds are accepted, with their properties, and its refused seeds refused.
#[test]
fn every_parser_accepts_its_real_files_and_refuses_the_bad_ones() {
    let scratch = std::env::temp_dir().join(format!("reneg-fuzz-seeds-{}", std::process::id()));
    let mut wrong = vec![];
    for (k, t) in targets::targets().iter().enumerate() {
        assert!(!t.seeds.is_empty(), "{}: no valid seed", t.name);
        let cases = t
            .seeds
            .iter()
            .map(|s| (s, true))
            .chain(t.refused.iter().map(|s| (s, false)));
        for (i, (input, valid)) in cases.enumerate() {
            match t.try_run(input, &scratch.join(format!("s{k}-{i}"))) {
                Ok(accepted) if accepted == valid => {}
                Ok(accepted) => wrong.push(format!(
                    "{} seed {i}: {} ({} bytes)",
                    t.name,
                    if accepted {
                        "accepted, should be refused"
                    } else {
                        "refused, should parse"
                    },
                    input.len()
                )),
                Err(m) => wrong.push(format!("{} seed {i}: panicked: {m}", t.name)),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
