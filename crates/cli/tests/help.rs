//! The CLI explains itself (issue 19): every option of every subcommand has a help line, and
//! `train`'s options show their defaults (taken from the training config's own defaults).

use std::process::Command;

fn help(sub: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(sub)
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success(), "{sub:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// `(option or argument, its help text)` from clap's help, in either of its layouts: the
/// text on the option's line after two or more spaces, or on the indented lines below it.
fn options(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = l.len() - t.len();
        if !((2..=6).contains(&indent) && (t.starts_with('-') || t.starts_with('<'))) {
            continue;
        }
        let (spec, same_line) = match t.find("  ") {
            Some(k) => (&t[..k], t[k..].trim()),
            None => (t, ""),
        };
        let flag = spec
            .split([' ', ','])
            .find(|w| w.starts_with("--") || w.starts_with('<'))
            .unwrap_or(spec)
            .to_string();
        let mut desc = same_line.to_string();
        for next in &lines[i + 1..] {
            let nt = next.trim_start();
            if next.len() - nt.len() < 10 || nt.is_empty() {
                break;
            }
            desc.push(' ');
            desc.push_str(nt);
        }
        out.push((flag, desc.trim().to_string()));
    }
    out
}

const SUBCOMMANDS: &[&[&str]] = &[
    &["generate"],
    &["embedding", "import"],
    &["embedding", "export"],
    &["embedding", "inspect"],
    &["embedding", "encode"],
    &["score"],
    &["train"],
    &["eval"],
    &["eval", "merge"],
    &["mini", "train"],
    &["mini", "experiment"],
];

#[test]
fn every_option_of_every_subcommand_has_a_help_line() {
    let mut missing = Vec::new();
    let mut seen = 0;
    for sub in SUBCOMMANDS {
        for (flag, desc) in options(&help(sub)) {
            seen += 1;
            // A line with only "[default: ...]" or "[possible values: ...]" explains nothing.
            if desc.is_empty() || desc.starts_with('[') {
                missing.push(format!("{} {flag}", sub.join(" ")));
            }
        }
    }
    assert!(seen > 100, "{seen} options parsed");
    assert!(missing.is_empty(), "options without help: {missing:?}");
}

#[test]
fn the_subcommand_list_is_complete() {
    // Every subcommand `reneg --help` lists is checked above.
    let top = help(&[]);
    for name in ["generate", "embedding", "score", "train", "eval", "mini"] {
        assert!(top.contains(&format!("  {name} ")), "{name}");
        assert!(SUBCOMMANDS.iter().any(|s| s[0] == name), "{name}");
    }
    let listed = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| !l.trim_start().starts_with("help"))
        .count();
    assert_eq!(listed, 6, "{top}");
}

#[test]
fn train_shows_the_defaults_of_its_config() {
    let opts = options(&help(&["train"]));
    let get = |f: &str| {
        opts.iter()
            .find(|(flag, _)| flag == f)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("{f} not in train --help"))
    };
    // The paper's defaults (RENEG.md), as TrainConfig sets them.
    for (flag, want) in [
        ("--steps", "[default: 4000]"),
        ("--lr", "[default: 0.005]"),
        ("--batch-size", "[default: 64]"),
        ("--guidance-scale", "[default: 7.5]"),
        ("--sampling-steps", "[default: 30]"),
        ("--grad-step-window", "[default: 10]"),
        ("--init", "[default: null]"),
    ] {
        let d = get(flag);
        assert!(d.contains(want), "{flag}: {d}");
    }
}
