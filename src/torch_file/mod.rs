//! PyTorch's `torch.save` container (a zip of `<prefix>/data.pkl`, `<prefix>/data/<key>`,
//! `version`, `byteorder`) holding one tensor: read safely, and written so that `torch.load`
//! (also with `weights_only=True`) reads it back, as the official ReNeg files are.

pub mod pickle;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use pickle::{StorageDtype, TensorRef};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

/// True when `bytes` starts like a zip archive (torch >= 1.6 `torch.save`).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// An opened `torch.save` zip: its pickle and its storages.
struct Archive<'a> {
    zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    prefix: String,
    path: &'a Path,
}

impl<'a> Archive<'a> {
    fn open(bytes: &'a [u8], path: &'a Path) -> Result<(Self, Vec<u8>)> {
        let bad = |msg: String| Error::file(path, msg);
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| bad(format!("not a readable PyTorch zip file ({e})")))?;
        let pkl_name = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .map(|n| n.to_string())
            .ok_or_else(|| {
                bad("a PyTorch file needs <prefix>/data.pkl; this zip has none".into())
            })?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        let pkl = read_entry(&mut zip, &pkl_name, path)?;
        if let Ok(mut bo) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            let _ = bo.read_to_string(&mut s);
            if s.trim() == "big" {
                return Err(bad("big-endian PyTorch files are not supported".into()));
            }
        }
        Ok((Self { zip, prefix, path }, pkl))
    }

    /// The tensor `t` describes, gathered from its storage into a contiguous f32 tensor.
    fn tensor(&mut self, t: &TensorRef) -> Result<(Tensor, DType)> {
        let name = format!("{}data/{}", self.prefix, t.storage_key);
        if self.zip.index_for_name(&name).is_none() {
            return Err(Error::file(
                self.path,
                format!("tensor storage {} missing", t.storage_key),
            ));
        }
        let data = read_entry(&mut self.zip, &name, self.path)?;
        gather(&data, t, self.path)
    }
}

/// The tensor that `t` views in the storage bytes `data`, gathered into a contiguous f32
/// tensor, with the dtype it was stored in. Shape, stride and offset come from the file: every
/// bound is checked, with checked arithmetic, before anything is allocated or indexed.
pub fn gather(data: &[u8], t: &TensorRef, path: &Path) -> Result<(Tensor, DType)> {
    let corrupt = |what: &str| Error::file(path, format!("tensor {what}: file is corrupt"));
    let elem = t.dtype.size();
    if t.shape.len() != t.stride.len() {
        return Err(corrupt("shape and stride differ in length"));
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .ok_or_else(|| corrupt("shape overflows"))?;
    // Views larger than their storage (expanded, zero-stride tensors) would let a tiny file
    // ask for any allocation; torch.save writes weights and embeddings whole.
    if numel > data.len() / elem.max(1) {
        return Err(corrupt("view has more elements than its storage"));
    }
    if numel > 0 {
        // Index of the last element viewed: the view must lie within the storage.
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |a, (&n, &s)| {
                a.checked_add((n - 1).checked_mul(s)?)
            })
            .ok_or_else(|| corrupt("view overflows"))?;
        let end = last
            .checked_add(1)
            .and_then(|e| e.checked_mul(elem))
            .ok_or_else(|| corrupt("view overflows"))?;
        if end > data.len() {
            return Err(corrupt("view reaches past its storage"));
        }
    }
    let value = |i: usize| -> f32 {
        let b = &data[i * elem..(i + 1) * elem];
        match t.dtype {
            StorageDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDtype::F64 => {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            StorageDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::I64 => {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
        }
    };
    // Gather the strided view (every index below `last`, checked above).
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let pos = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(value(pos));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let stored = match t.dtype {
        StorageDtype::F32 => DType::F32,
        StorageDtype::F16 => DType::F16,
        StorageDtype::BF16 => DType::BF16,
        StorageDtype::F64 => DType::F64,
        StorageDtype::I64 => DType::I64,
    };
    Ok((
        Tensor::from_vec(out, t.shape.as_slice(), &Device::Cpu)?,
        stored,
    ))
}

/// How much larger than its compressed bytes a zip entry may declare itself: torch.save stores
/// entries uncompressed, so a large ratio is a zip bomb, not a PyTorch file.
const MAX_INFLATION: u64 = 64;

/// The bytes of zip entry `name`, at most its declared size, which must be plausible (at most
/// [`MAX_INFLATION`] times its compressed size, or 1 MiB) and must all be there.
fn read_entry(
    zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
    path: &Path,
) -> Result<Vec<u8>> {
    let bad = |msg: String| Error::file(path, msg);
    let f = zip
        .by_name(name)
        .map_err(|e| bad(format!("cannot read {name}: {e}")))?;
    let declared = f.size();
    let limit = f
        .compressed_size()
        .saturating_mul(MAX_INFLATION)
        .max(1 << 20);
    if declared > limit {
        return Err(bad(format!(
            "{name} declares {declared} bytes from {} compressed: not a PyTorch file (a zip bomb?)",
            f.compressed_size()
        )));
    }
    let mut data = Vec::new();
    f.take(declared)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("cannot read {name}: {e}")))?;
    if data.len() as u64 != declared {
        return Err(bad(format!(
            "{name} is cut short ({} of {declared} bytes)",
            data.len()
        )));
    }
    Ok(data)
}

/// Reads the single tensor of a `torch.save` zip file, as f32, with the dtype it was stored in.
pub fn read(bytes: &[u8], path: &Path) -> Result<(Tensor, DType)> {
    let (mut archive, pkl) = Archive::open(bytes, path)?;
    let t = pickle::read_tensor(&pkl).map_err(|e| {
        Error::file(
            path,
            format!("{e}; expected one tensor saved with torch.save"),
        )
    })?;
    archive.tensor(&t)
}

/// Reads a state dict saved with `torch.save` (names as in the file, nested dicts joined
/// with "."), every tensor as f32.
pub fn read_state_dict(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let (mut archive, pkl) = Archive::open(bytes, path)?;
    let entries = pickle::read_state_dict(&pkl).map_err(|e| {
        Error::file(
            path,
            format!("{e}; expected a state dict saved with torch.save"),
        )
    })?;
    entries
        .into_iter()
        .map(|(name, t)| Ok((name, archive.tensor(&t)?.0)))
        .collect()
}

/// Reads the tensors of a `torch.save` file whose names `select` keeps (and renames), f16 and
/// bf16 as stored, the others as f32:
/// the pickle is parsed first and only the kept storages are read, so a checkpoint's optimizer
/// state or EMA copy is never loaded. `bytes` may be a mapped file: nothing is held twice.
pub fn read_state_dict_selected(
    bytes: &[u8],
    path: &Path,
    select: impl Fn(&[String]) -> Vec<(usize, String)>,
) -> Result<HashMap<String, Tensor>> {
    let (mut archive, pkl) = Archive::open(bytes, path)?;
    let entries = pickle::read_state_dict(&pkl).map_err(|e| {
        Error::file(
            path,
            format!("{e}; expected a state dict saved with torch.save"),
        )
    })?;
    let names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    // Each tensor in the dtype it was stored in (f16 and bf16 exactly: the f32 gather is
    // lossless), so a half-precision checkpoint takes half the memory of f32.
    select(&names)
        .into_iter()
        .map(|(i, name)| {
            let (t, stored) = archive.tensor(&entries[i].1)?;
            let t = match stored {
                DType::F16 | DType::BF16 => t.to_dtype(stored)?,
                _ => t,
            };
            Ok((name, t))
        })
        .collect()
}

/// A tensor's storage dtype and little-endian bytes (f32, f16, bf16 or f64; others as f32).
fn storage(tensor: &Tensor) -> Result<(StorageDtype, Vec<u8>)> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        DType::F16 => (
            StorageDtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            StorageDtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            StorageDtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            StorageDtype::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    })
}

/// Writes `tensor` as a `torch.save` zip file under the archive prefix `archive/`, each record
/// 64-byte aligned as torch writes them.
pub fn write<W: Write + std::io::Seek>(tensor: &Tensor, out: W) -> Result<()> {
    let (dtype, bytes) = storage(tensor)?;
    let pkl = pickle::write_tensor(dtype, tensor.dims(), "0");
    write_zip(&pkl, &[bytes], out)
}

/// Writes `{name: tensor}` as `torch.save` writes a dict of tensors (what `torch.load` gives
/// back as a dict), in the given order.
pub fn write_dict<W: Write + std::io::Seek>(tensors: &[(&str, &Tensor)], out: W) -> Result<()> {
    let mut entries = vec![];
    let mut storages = vec![];
    for (i, (name, t)) in tensors.iter().enumerate() {
        let (dtype, bytes) = storage(t)?;
        entries.push((*name, dtype, t.dims().to_vec(), i.to_string()));
        storages.push(bytes);
    }
    write_zip(&pickle::write_dict(&entries), &storages, out)
}

/// The zip of a pickle and its storages `data/0`, `data/1`, ...
fn write_zip<W: Write + std::io::Seek>(pkl: &[u8], storages: &[Vec<u8>], out: W) -> Result<()> {
    let io = |e: zip::result::ZipError| Error::Invalid(format!("cannot write PyTorch file: {e}"));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut zw = zip::ZipWriter::new(out);
    let data: Vec<(String, &[u8])> = storages
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("archive/data/{i}"), b.as_slice()))
        .collect();
    let mut records: Vec<(&str, &[u8])> =
        vec![("archive/data.pkl", pkl), ("archive/byteorder", b"little")];
    records.extend(data.iter().map(|(n, b)| (n.as_str(), *b)));
    records.push(("archive/version", b"3\n"));
    records.push((
        "archive/.data/serialization_id",
        b"0000000000000000000000000000000000000000",
    ));
    for (name, data) in records {
        zw.start_file(name, opts).map_err(io)?;
        zw.write_all(data)
            .map_err(|e| Error::Invalid(format!("cannot write PyTorch file: {e}")))?;
    }
    zw.finish().map_err(io)?;
    Ok(())
}
