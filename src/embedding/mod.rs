//! The negative embedding as a value: a `[1, L, D]` tensor in the text encoder's output space
//! (diffusers' `negative_prompt_embeds`), with the other parts of a negative where a family has
//! them (`negative_pooled_prompt_embeds`, `negative_prompt_attention_mask`:
//! [`crate::conditioning`]), and metadata. A file with one part holds one tensor, as before; a
//! file with several holds each under its diffusers name (a `.bin` as `torch.save` of a dict).
//! Loads safetensors files and the official ReNeg `torch.save` files (read without running any
//! code); saves safetensors with metadata in the header and PyTorch-loadable `.pt`/`.bin` files.

pub mod textual_inversion;

use crate::conditioning::{Conditioning, Part, Shape};
use crate::error::{Error, Result};
use crate::torch_file;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The tensor name used in saved safetensors files.
pub const TENSOR_NAME: &str = "negative_prompt_embeds";

#[derive(Debug, Clone)]
pub struct NegativeEmbedding {
    /// `[1, L, D]`, f32 on the CPU.
    pub tensor: Tensor,
    /// Free-form provenance (base model, reward, steps, tool version, ...).
    pub metadata: BTreeMap<String, String>,
    /// The element type the file stored (the tensor itself is always held as f32).
    pub stored_dtype: DType,
    /// `[1, P]` (SDXL's pooled text embedding), f32, when the file has one.
    pub pooled: Option<Tensor>,
    /// `[1, L]` of 0 and 1 (PixArt's and LTX's attention mask), f32, when the file has one.
    pub mask: Option<Tensor>,
}

/// Summary statistics for `reneg embedding inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub mean: f64,
    /// Unbiased (n - 1), as `torch.std`.
    pub std: f64,
    pub row0_norm: f64,
    pub row_norm_min: f64,
    pub row_norm_median: f64,
    pub row_norm_max: f64,
    /// The text encoders whose output width this embedding has.
    pub fits: String,
    /// How many rows at the end (row 1 onwards at most) are bitwise equal to one another:
    /// L - 1 is the shape of T5's output for "" (`</s>` then padding), the official PixArt
    /// file's, which then takes the mask of "".
    pub identical_trailing_rows: usize,
}

/// Which text encoder produces embeddings of width `d`.
pub fn encoder_for_width(d: usize) -> &'static str {
    match d {
        768 => "SD 1.x (CLIP ViT-L/14 text encoder, 768 wide)",
        1024 => "SD 2.x (OpenCLIP ViT-H/14 text encoder, 1024 wide)",
        4096 => "PixArt-alpha (T5-XXL, 4096 wide); not a Stable Diffusion 1.x/2.x embedding",
        _ => "no standard text encoder (a tiny or custom model)",
    }
}

impl NegativeEmbedding {
    pub fn new(tensor: Tensor) -> Result<Self> {
        let stored_dtype = tensor.dtype();
        let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(Self {
            tensor,
            metadata: BTreeMap::new(),
            stored_dtype,
            pooled: None,
            mask: None,
        })
    }

    /// Loads a safetensors file holding one tensor, or a PyTorch `torch.save` file of one
    /// tensor (the official ReNeg `.bin`s). A `[L, D]` tensor is taken as `[1, L, D]`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::file(path, "embedding file not found"),
            _ => Error::file(path, format!("cannot read: {e}")),
        })?;
        let (tensor, metadata, stored_dtype, extra) = if torch_file::is_zip(&bytes) {
            match torch_file::read(&bytes, path) {
                Ok((t, dtype)) => (t, BTreeMap::new(), dtype, None),
                // A dict of a negative's parts; anything else keeps the single-tensor error.
                Err(single) => match torch_file::read_state_dict(&bytes, path) {
                    Ok(dict) if dict.keys().any(|k| Part::of_name(k).is_some()) => {
                        let parts = Conditioning::from_named(dict.into_iter().collect(), path)?;
                        let dtype = parts.embeds.dtype();
                        (
                            parts.embeds,
                            BTreeMap::new(),
                            dtype,
                            Some((parts.pooled, parts.mask)),
                        )
                    }
                    _ => return Err(single),
                },
            }
        } else if bytes.starts_with(b"\x80\x02\x8a\x0a") {
            // The legacy format opens with a pickled magic number (PROTO 2, LONG1 of 10 bytes).
            return Err(Error::file(
                path,
                "legacy (pre-1.6) PyTorch format; re-save it in Python with torch.save(t, path) from a current torch",
            ));
        } else {
            let (parts, meta) = read_safetensors(&bytes, path)?;
            let dtype = parts.embeds.dtype();
            (parts.embeds, meta, dtype, Some((parts.pooled, parts.mask)))
        };
        let tensor = match tensor.rank() {
            2 => tensor.unsqueeze(0)?,
            3 if tensor.dim(0)? == 1 => tensor,
            _ => {
                return Err(Error::file(
                    path,
                    format!(
                        "holds a tensor of shape {:?}; a negative embedding is [1, tokens, width]",
                        tensor.dims()
                    ),
                ))
            }
        };
        if !matches!(
            stored_dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(Error::file(
                path,
                format!("holds {stored_dtype:?} values; a negative embedding is floating point"),
            ));
        }
        if tensor.elem_count() == 0 {
            return Err(Error::file(
                path,
                format!(
                    "holds an empty tensor of shape {:?}; a negative embedding has at least one token and one width",
                    tensor.dims()
                ),
            ));
        }
        let tensor = match tensor.rank() {
            3 => tensor,
            _ => {
                return Err(Error::file(
                    path,
                    format!(
                        "holds a tensor of shape {:?}; a negative embedding is [1, tokens, width]",
                        tensor.dims()
                    ),
                ))
            }
        };
        let (pooled, mask) = extra.unwrap_or((None, None));
        let tokens = tensor.dim(1)?;
        let pooled = pooled
            .map(|p| one_row(p, None, "negative_pooled_prompt_embeds", path))
            .transpose()?;
        let mask = mask
            .map(|m| one_row(m, Some(tokens), "negative_prompt_attention_mask", path))
            .transpose()?;
        Ok(Self {
            tensor: tensor.to_dtype(DType::F32)?,
            metadata,
            stored_dtype,
            pooled,
            mask,
        })
    }

    /// The negative as the pipeline takes it (on `device`, in `dtype`).
    pub fn conditioning(&self, dtype: DType, device: &Device) -> Result<Conditioning> {
        Conditioning {
            embeds: self.tensor.clone(),
            pooled: self.pooled.clone(),
            mask: self.mask.clone(),
        }
        .map(|_, t| Ok(t.to_device(device)?.to_dtype(dtype)?))
    }

    /// A negative holding `c`'s parts (batch 1; as f32 on the CPU), stored as f32.
    pub fn from_conditioning(c: &Conditioning) -> Result<Self> {
        let c = c.map(|_, t| Ok(t.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?))?;
        Ok(Self {
            tensor: c.embeds,
            metadata: BTreeMap::new(),
            stored_dtype: DType::F32,
            pooled: c.pooled,
            mask: c.mask,
        })
    }

    /// The parts this embedding has, under the negative's diffusers names, embeddings first.
    pub fn parts(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![(Part::Embeds.name(true), &self.tensor)];
        v.extend(self.pooled.iter().map(|t| (Part::Pooled.name(true), t)));
        v.extend(self.mask.iter().map(|t| (Part::Mask.name(true), t)));
        v
    }

    pub fn tokens(&self) -> usize {
        self.tensor.dims()[1]
    }

    pub fn width(&self) -> usize {
        self.tensor.dims()[2]
    }

    /// Saves as safetensors (one tensor named [`TENSOR_NAME`], metadata in the header),
    /// atomically.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let mut meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        meta.entry("format".into())
            .or_insert_with(|| "reneg negative embedding".into());
        let bytes = crate::io::safetensors_f32(&self.parts(), meta, "cannot serialise embedding")?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Saves as a PyTorch file that `torch.load` reads back as the same tensor (as the
    /// official inference script expects), atomically.
    pub fn save_torch(&self, path: &Path) -> Result<()> {
        let mut buf = std::io::Cursor::new(Vec::new());
        match self.parts().as_slice() {
            [(_, one)] => torch_file::write(one, &mut buf)?,
            parts => torch_file::write_dict(parts, &mut buf)?,
        }
        crate::io::write_atomic(path, buf.get_ref())
    }

    /// Saves in the format its extension names: `.safetensors`, or `.pt` / `.bin` / `.pth`.
    pub fn save(&self, path: &Path) -> Result<()> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => self.save_safetensors(path),
            Some("pt" | "bin" | "pth") => self.save_torch(path),
            _ => Err(Error::file(
                path,
                "unknown embedding format: use a .safetensors, .pt or .bin file name",
            )),
        }
    }

    pub fn stats(&self) -> Result<Stats> {
        let t = self.tensor.to_dtype(DType::F64)?;
        let n = t.elem_count() as f64;
        let mean = t.mean_all()?.to_scalar::<f64>()?;
        let var = (t
            .broadcast_sub(&Tensor::new(mean, &Device::Cpu)?)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?)
            / (n - 1.0).max(1.0);
        let mut norms: Vec<f64> = t.squeeze(0)?.sqr()?.sum(1)?.sqrt()?.to_vec1::<f64>()?;
        let Some(&row0) = norms.first() else {
            return Err(Error::Invalid(format!(
                "the embedding of shape {:?} is empty: nothing to summarise",
                self.tensor.dims()
            )));
        };
        norms.sort_by(f64::total_cmp);
        Ok(Stats {
            shape: self.tensor.dims().to_vec(),
            dtype: format!("{:?}", self.stored_dtype).to_lowercase(),
            mean,
            std: var.sqrt(),
            row0_norm: row0,
            row_norm_min: norms[0],
            row_norm_median: norms[norms.len() / 2],
            row_norm_max: norms[norms.len() - 1],
            fits: encoder_for_width(self.width()).into(),
            identical_trailing_rows: self.identical_trailing_rows()?,
        })
    }

    /// How many of the last rows (not row 0) are bitwise equal to the last one; 0 for a
    /// one-row embedding, 1 when the last row is unlike the one before.
    pub fn identical_trailing_rows(&self) -> Result<usize> {
        let rows: Vec<Vec<u32>> = self
            .tensor
            .squeeze(0)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|r| r.into_iter().map(f32::to_bits).collect())
            .collect();
        let Some(last) = rows.last().filter(|_| rows.len() > 1) else {
            return Ok(0);
        };
        Ok(rows[1..].iter().rev().take_while(|r| *r == last).count())
    }

    /// The mask of "" (`[1, L]`: 1 on row 0, `</s>`; 0 on the padding) when this negative has
    /// no mask and rows 1 to L - 1 are bitwise equal, the shape of T5's output for "" (the
    /// official PixArt file); None otherwise.
    pub fn mask_of_empty(&self) -> Result<Option<Tensor>> {
        let l = self.tokens();
        if self.mask.is_some() || l < 2 || self.identical_trailing_rows()? != l - 1 {
            return Ok(None);
        }
        let mut m = vec![0f32; l];
        m[0] = 1.0;
        Ok(Some(Tensor::from_vec(m, (1, l), &Device::Cpu)?))
    }

    /// Refuses a negative that the model's encoder (making conditionings of `shape`) could
    /// not have produced: a part it has no place for, a part it needs missing, a wrong shape.
    pub fn check_fits(&self, shape: &Shape, source: &Path) -> Result<()> {
        let (tokens, width) = (shape.tokens, shape.width);
        let unexpected = [
            (
                Part::Pooled,
                self.pooled.is_some() && shape.pooled.is_none(),
            ),
            (Part::Mask, self.mask.is_some() && !shape.mask),
        ];
        if let Some((part, _)) = unexpected.iter().find(|(_, bad)| *bad) {
            return Err(Error::file(
                source,
                format!(
                    "has a {} part, which this model's text encoder ({}) has no place for",
                    part.name(true),
                    encoder_for_width(width)
                ),
            ));
        }
        if self.width() != width || self.tokens() != tokens {
            return Err(Error::file(
                source,
                format!(
                    "embedding is [1, {}, {}] ({}), but the model's text encoder gives [1, {tokens}, {width}] ({})",
                    self.tokens(),
                    self.width(),
                    encoder_for_width(self.width()),
                    encoder_for_width(width)
                ),
            ));
        }
        if shape.mask {
            match &self.mask {
                None if self.mask_of_empty()?.is_none() => {
                    return Err(Error::file(
                        source,
                        format!(
                            "has no {} part; this model's cross-attention needs one of [1, {tokens}] (1 on the rows to attend, 0 on padding): add it to the file (diffusers refuses a negative without it too)",
                            Part::Mask.name(true)
                        ),
                    ))
                }
                None => {}
                Some(m) => {
                    if m.dims() != [1, tokens] {
                        return Err(Error::file(
                            source,
                            format!(
                                "{} is {:?}; this model needs [1, {tokens}], one value per row of the embeddings",
                                Part::Mask.name(true),
                                m.dims()
                            ),
                        ));
                    }
                    let v = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    if v.iter().any(|&x| x != 0.0 && x != 1.0) || !v.contains(&1.0) {
                        return Err(Error::file(
                            source,
                            format!(
                                "{} must hold 0 and 1, with at least one 1",
                                Part::Mask.name(true)
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(p) = shape.pooled {
            match &self.pooled {
                None => {
                    return Err(Error::file(
                        source,
                        format!(
                            "has no {} part; this model needs one of [1, {p}] (a negative for another model family?)",
                            Part::Pooled.name(true)
                        ),
                    ))
                }
                Some(t) if t.dims() != [1, p] => {
                    return Err(Error::file(
                        source,
                        format!(
                            "{} is {:?}; this model needs [1, {p}]",
                            Part::Pooled.name(true),
                            t.dims()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// A safetensors embedding: one tensor (any name, as before), or several named as a negative's
/// parts.
fn read_safetensors(bytes: &[u8], path: &Path) -> Result<(Conditioning, BTreeMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Error::file(
            path,
            format!("neither a PyTorch file nor a valid safetensors file ({e})"),
        )
    })?;
    let names = st.names();
    let named_parts = names.iter().all(|n| Part::of_name(n).is_some());
    let (one_tensor, all_parts) = (names.len() == 1, !names.is_empty() && named_parts);
    if !one_tensor && !all_parts {
        return Err(Error::file(
            path,
            format!(
                "holds {} tensors ({}); an embedding file holds one, or a negative's parts under their names ({})",
                names.len(),
                names
                    .iter()
                    .take(5)
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                Part::ALL.map(|p| p.name(true)).join(", ")
            ),
        ));
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| Error::file(path, format!("cannot read tensor: {e}")))?;
    let parts = if tensors.len() == 1 && !named_parts {
        Conditioning {
            embeds: tensors.into_values().next().expect("one tensor"),
            pooled: None,
            mask: None,
        }
    } else {
        Conditioning::from_named(tensors, path)?
    };
    let metadata = safetensors::SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().clone())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    Ok((parts, metadata))
}

/// A pooled embedding or a mask as `[1, n]` (a `[n]` file tensor gains the batch axis), f32;
/// a mask's `n` must be the embeddings' token count.
fn one_row(t: Tensor, n: Option<usize>, name: &str, path: &Path) -> Result<Tensor> {
    let t = if t.rank() == 1 { t.unsqueeze(0)? } else { t };
    let ok = t.rank() == 2 && t.dim(0)? == 1 && n.is_none_or(|n| t.dim(1).ok() == Some(n));
    if !ok {
        return Err(Error::file(
            path,
            format!(
                "{name} has shape {:?}; it should be [1, {}]",
                t.dims(),
                n.map_or("width".to_string(), |n| n.to_string())
            ),
        ));
    }
    Ok(t.to_dtype(DType::F32)?)
}
