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
        let mut pkl = vec![];
        zip.by_name(&pkl_name)
            .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
            .map_err(|e| bad(format!("cannot read data.pkl: {e}")))?;
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
        let path = self.path;
        let bad = |msg: String| Error::file(path, msg);
        let mut data = vec![];
        self.zip
            .by_name(&format!("{}data/{}", self.prefix, t.storage_key))
            .and_then(|mut f| f.read_to_end(&mut data).map_err(Into::into))
            .map_err(|e| bad(format!("tensor storage {} missing: {e}", t.storage_key)))?;
        let elem = t.dtype.size();
        let numel: usize = t.shape.iter().product();
        // Index of the last element viewed, to check the view lies within the storage.
        let last = t.offset
            + t.shape
                .iter()
                .zip(&t.stride)
                .map(|(&n, &s)| n.saturating_sub(1) * s)
                .sum::<usize>();
        if numel > 0 && (last + 1) * elem > data.len() {
            return Err(bad(
                "tensor view reaches past its storage: file is corrupt".into()
            ));
        }
        let value = |i: usize| -> f32 {
            let b = &data[i * elem..(i + 1) * elem];
            match t.dtype {
                StorageDtype::F32 => f32::from_le_bytes(b.try_into().unwrap()),
                StorageDtype::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
                StorageDtype::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
                StorageDtype::BF16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            }
        };
        // Gather the strided view.
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
        };
        Ok((
            Tensor::from_vec(out, t.shape.as_slice(), &Device::Cpu)?,
            stored,
        ))
    }
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

/// Writes `tensor` (f32, f16, bf16 or f64) as a `torch.save` zip file under the archive
/// prefix `archive/`, each record 64-byte aligned as torch writes them.
pub fn write<W: Write + std::io::Seek>(tensor: &Tensor, out: W) -> Result<()> {
    let (dtype, bytes): (StorageDtype, Vec<u8>) = match tensor.dtype() {
        DType::F16 => (
            StorageDtype::F16,
            tensor
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            StorageDtype::BF16,
            tensor
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            StorageDtype::F64,
            tensor
                .flatten_all()?
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            StorageDtype::F32,
            tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    let pkl = pickle::write_tensor(dtype, tensor.dims(), "0");
    let io = |e: zip::result::ZipError| Error::Invalid(format!("cannot write PyTorch file: {e}"));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut zw = zip::ZipWriter::new(out);
    let records: [(&str, &[u8]); 5] = [
        ("archive/data.pkl", &pkl),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &bytes),
        ("archive/version", b"3\n"),
        (
            "archive/.data/serialization_id",
            b"0000000000000000000000000000000000000000",
        ),
    ];
    for (name, data) in records {
        zw.start_file(name, opts).map_err(io)?;
        zw.write_all(data)
            .map_err(|e| Error::Invalid(format!("cannot write PyTorch file: {e}")))?;
    }
    zw.finish().map_err(io)?;
    Ok(())
}
