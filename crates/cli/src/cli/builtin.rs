//! The built-in default model: the committed miniature world (`assets/mini`), embedded in the
//! binary, so that an installed `reneg` (`cargo install --path crates/cli`) has it wherever it runs and
//! never picks up a folder that happens to be called `assets/mini` in the working directory.
//!
//! On first use the files are written to `<data dir>/mini-<hash of the contents>/` (the data
//! dir is `$RENEG_DATA_DIR`, else `$XDG_DATA_HOME/reneg`, else `~/.local/share/reneg`, else the
//! temporary directory), whole or not at all (written beside it, then renamed), and reused
//! after. `RENEG_MINI=DIR` uses another miniature world folder instead.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The world's files, relative paths and contents: everything under `assets/mini` but the
/// experiment's outputs (listed by build.rs).
const FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/mini_files.rs"));

/// FNV-1a over the names and contents: a new build with other files gets another folder.
fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for &b in name
            .as_bytes()
            .iter()
            .chain([0u8].iter())
            .chain(bytes.iter())
        {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn data_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("RENEG_DATA_DIR")
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("reneg")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/reneg")))
        .unwrap_or_else(|| std::env::temp_dir().join("reneg"))
}

/// The built-in world's folder, written out on first use.
pub fn mini_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("RENEG_MINI").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = data_dir();
    let dir = base.join(format!("mini-{:016x}", content_hash()));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let tmp = base.join(format!(
        ".mini-{}-{:016x}",
        std::process::id(),
        content_hash()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    write_all(&tmp).with_context(|| {
        format!(
            "{}: cannot write the built-in model here; set RENEG_DATA_DIR to a writable folder",
            base.display()
        )
    })?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process wrote it first: theirs is as good.
        Err(_) if dir.join(".complete").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            Err(e).with_context(|| format!("{}: cannot write the built-in model", dir.display()))
        }
    }
}

fn write_all(dir: &Path) -> std::io::Result<()> {
    for (name, bytes) in FILES {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, bytes)?;
    }
    std::fs::write(dir.join(".complete"), b"")
}
