//! File helpers: atomic writes, so an interrupted run never leaves a half-written file, and
//! 8-bit RGB PNG reading and writing.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling `write_atomic` writes before renaming.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` via a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, format!("cannot write: {e}"))
    })
}

/// An 8-bit RGB image.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb {
    /// From `[3, H, W]` pixels in [-1, 1] (a decoder's output; clamped, then rounded).
    pub fn from_pixels(image: &candle_core::Tensor) -> Result<Self> {
        let img = ((image
            .to_dtype(candle_core::DType::F32)?
            .clamp(-1f32, 1f32)?
            + 1.0)?
            * 127.5)?
            .round()?
            .permute((1, 2, 0))?
            .to_dtype(candle_core::DType::U8)?;
        let (height, width, _) = img.dims3()?;
        Ok(Self {
            width,
            height,
            data: img.flatten_all()?.to_vec1::<u8>()?,
        })
    }

    /// Channel-major `[3, height, width]` values in [0, 1].
    pub fn to_chw(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = px[c] as f32 / 255.0;
            }
        }
        out
    }
}

/// Reads a PNG as 8-bit RGB (grey expanded, alpha dropped).
pub fn read_png(path: &Path) -> Result<Rgb> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .map_err(|e| Error::file(path, format!("not a PNG image: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| Error::file(path, format!("corrupt PNG: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let ch = info.color_type.samples();
    let mut data = Vec::with_capacity(3 * w * h);
    for p in 0..w * h {
        for c in 0..3 {
            data.push(buf[p * ch + if ch >= 3 { c } else { 0 }]);
        }
    }
    Ok(Rgb {
        width: w,
        height: h,
        data,
    })
}

/// Writes 8-bit RGB as a PNG, atomically, with an optional `parameters` text chunk (the
/// generation settings, as other SD front ends write them).
pub fn write_png(img: &Rgb, path: &Path, parameters: Option<&str>) -> Result<()> {
    write_atomic_with(path, |f| {
        let mut enc = png::Encoder::new(
            std::io::BufWriter::new(f),
            img.width as u32,
            img.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            enc.add_text_chunk("parameters".into(), text.into())
                .map_err(std::io::Error::other)?;
        }
        let mut w = enc.write_header().map_err(std::io::Error::other)?;
        w.write_image_data(&img.data)
            .map_err(std::io::Error::other)?;
        w.finish().map_err(std::io::Error::other)
    })
}

/// A file mapped into memory, for weights: read on demand by the OS instead of copied whole
/// into a buffer first (a weights file is then in memory once, as its tensors).
pub fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, "file not found"),
        _ => Error::file(path, format!("cannot read: {e}")),
    })?;
    // SAFETY: the map is read-only and dropped before the function that asked for it returns
    // its tensors; as with every memory-mapped reader (candle's, safetensors'), a file truncated
    // by another process meanwhile is outside what reneg can guard against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot map: {e}")))
}

/// `tensors` (any float dtype, any device) as the bytes of an f32 safetensors file with
/// `metadata` in its header: what the project's own files (embeddings, checkpoints, gradient
/// exchange) are written as. `what` names the file kind in an error.
pub fn safetensors_f32(
    tensors: &[(&str, &candle_core::Tensor)],
    metadata: std::collections::HashMap<String, String>,
    what: &str,
) -> Result<Vec<u8>> {
    let data = tensors
        .iter()
        .map(|(_, t)| -> Result<Vec<u8>> {
            Ok(t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect())
        })
        .collect::<Result<Vec<_>>>()?;
    let views = tensors
        .iter()
        .zip(&data)
        .map(|((name, t), d)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), d)
                .map(|v| (*name, v))
                .map_err(|e| Error::Invalid(format!("{what}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
    sorted_header(bytes).map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

/// A safetensors file's bytes with its JSON header's keys in sorted order (tensor names, and
/// the metadata's keys), so the same content always gives the same bytes: the safetensors
/// crate writes the metadata in hash-map order, which changes from run to run. The header
/// keeps its length (the same entries, compactly written) and the crate's padding (spaces
/// to a multiple of 8 bytes); the data offsets are relative to the data, which is unchanged.
pub fn sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or("no header")?,
    ) as usize;
    let header = bytes.get(8..8 + n).ok_or("header past the end")?;
    // serde_json's map is ordered by key (the preserve_order feature is not enabled).
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut sorted = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if sorted.len() > n {
        return Err(format!("sorted header is {} bytes, not {n}", sorted.len()));
    }
    sorted.resize(n, b' ');
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..8]);
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// The tensors (on the CPU) and header metadata of a safetensors file's `bytes`; `bad` turns a
/// reader's message into the caller's error.
pub fn read_safetensors_meta(
    bytes: &[u8],
    bad: impl Fn(String) -> Error,
) -> Result<(
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, String>,
)> {
    let tensors = candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// The SHA-256 of a file's bytes, in hex (what `sha256sum` prints and the Hub names LFS files
/// by); for a folder, the SHA-256 of the `sha256sum`-style lines ("HASH  relative/path") of
/// every file under it, in path order. An evaluation records it for each file that shapes its
/// images or scores, so that a resume with the same path but other content is refused.
pub fn content_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    fn file(path: &Path) -> Result<String> {
        let mut f = std::fs::File::open(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Ok(format!("{:x}", h.finalize()))
    }
    fn walk(dir: &Path, root: &Path, lines: &mut Vec<String>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::file(dir, format!("cannot read folder: {e}")))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, root, lines)?;
            } else {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                lines.push(format!("{}  {}", file(&p)?, rel.display()));
            }
        }
        Ok(())
    }
    if path.is_dir() {
        let mut lines = vec![];
        walk(path, path, &mut lines)?;
        let mut h = Sha256::new();
        for l in &lines {
            h.update(l.as_bytes());
            h.update(b"\n");
        }
        Ok(format!("{:x}", h.finalize()))
    } else {
        file(path)
    }
}
