//! Lists the built-in miniature world's files (`assets/mini`) for `include_bytes!`, so that
//! the embedded world is whatever the folder holds (a ControlNet, masks) and no hand-kept list
//! can miss a file. Left out: the experiment's outputs and hidden files (training checkpoints).

use std::path::{Path, PathBuf};

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a readable directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let rel = p.strip_prefix(root).unwrap();
        if name.starts_with('.') || rel == Path::new("experiment") {
            continue;
        }
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../../assets/mini");
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let mut code = String::from("&[\n");
    for p in &files {
        // Names with '/' on every platform: they are joined onto the data folder.
        let rel: Vec<String> = p
            .strip_prefix(&root)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        code.push_str(&format!(
            "    ({:?}, include_bytes!({:?}) as &[u8]),\n",
            rel.join("/"),
            p.display().to_string()
        ));
    }
    code.push_str("]\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mini_files.rs");
    std::fs::write(out, code).unwrap();
}
