//! What the family CLI tests (videocrafter.rs, sdxl.rs) share: a fresh temporary folder, the
//! binary run with arguments, and the two outcomes they assert (success; a refusal as one line
//! on stderr with exit code 2).

use std::path::PathBuf;
use std::process::Command;

/// A fresh, empty folder named after the test binary's `tag` and this process.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn reneg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reneg"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `args`, asserting success; stdout and stderr together.
pub fn ok(args: &[&str]) -> String {
    let o = reneg(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{args:?}: {err}");
    String::from_utf8_lossy(&o.stdout).to_string() + &err
}

/// Runs `args`, asserting exit code 2 and one line on stderr holding every needle.
#[allow(dead_code)] // not every test binary has a bad input
pub fn refused(args: &[&str], needles: &[&str]) {
    let o = reneg(args);
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(lines.len(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
}
