//! The long fuzz run (issue 16): every parser that reads a user's file, on mutated real files.
//!
//!     cargo run --release --example fuzz -- --iterations 50000 [--seed S]
//!
//! `--iterations` is per target (23 targets). Prints the executions, the time and every crash;
//! a crashing input is saved under `fuzz-crashes/` for a regression test. Exits 1 on a crash.
//! The CI-sized run of the same targets is `tests/fuzz.rs`.

#[path = "fuzz/targets.rs"]
mod targets;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{flag} takes a number"))
            })
            .unwrap_or(default)
    };
    let iterations = value("--iterations", 10_000) as usize;
    let seed = value("--seed", 1);
    let scratch = std::env::temp_dir().join(format!("reneg-fuzz-{}", std::process::id()));
    let t = std::time::Instant::now();
    let all = targets::targets();
    let mut total = 0;
    let mut crashes = vec![];
    for (k, target) in all.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let (n, c) = targets::run_all(
            std::slice::from_ref(target),
            iterations,
            seed ^ k as u64,
            &scratch,
        );
        println!(
            "{:<58} {n:>8} executions {:>7.1} s {} crash(es)",
            target.name,
            t0.elapsed().as_secs_f64(),
            c.len()
        );
        total += n;
        crashes.extend(c);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "total: {total} executions over {} targets in {:.0} s, {} crash(es)",
        all.len(),
        t.elapsed().as_secs_f64(),
        crashes.len()
    );
    if !crashes.is_empty() {
        std::fs::create_dir_all("fuzz-crashes").unwrap();
        for (i, c) in crashes.iter().enumerate() {
            let p = format!("fuzz-crashes/{i:04}.bin");
            std::fs::write(&p, &c.input).unwrap();
            println!("crash in {}: {} (input {p})", c.target, c.message);
        }
        std::process::exit(1);
    }
}
