//! The command line parses, prints and maps errors to exit codes; what a run does lives in the
//! library (`reneg::run`). This holds it to that: no function in the CLI's source longer than
//! 60 lines (issue 30). Lengths count from a function's `fn` line to its closing brace at the
//! same indentation (rustfmt's layout, which CI checks).

use std::path::{Path, PathBuf};

const LIMIT: usize = 60;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (name, lines) of every function in `text`.
fn functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = vec![];
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let after_pub = body
            .strip_prefix("pub(crate) ")
            .or_else(|| body.strip_prefix("pub "))
            .unwrap_or(body);
        let Some(rest) = after_pub.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(j) = lines[i + 1..].iter().position(|l| *l == close) {
            out.push((name, j + 2));
        }
    }
    out
}

#[test]
fn the_counting_finds_long_functions() {
    let long = format!("fn long() {{\n{}}}\n", "    let x = 1;\n".repeat(70));
    assert_eq!(functions(&long), vec![("long".to_string(), 72)]);
    let nested = "pub fn a() {\n    fn b() {\n        1;\n    }\n}\n";
    assert_eq!(
        functions(nested),
        vec![("a".to_string(), 5), ("b".to_string(), 3)]
    );
}

#[test]
fn no_cli_function_is_longer_than_sixty_lines() {
    let mut files = vec![];
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 5, "the CLI's sources were found");
    let mut long = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (name, n) in functions(&text) {
            if n > LIMIT {
                long.push(format!("{}: {name} ({n} lines)", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions past {LIMIT} lines (move what they decide into reneg::run): {long:#?}"
    );
}
