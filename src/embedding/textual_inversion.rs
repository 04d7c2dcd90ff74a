//! The community's negative textual-inversion embeddings (e.g. EasyNegative): `n` vectors in
//! the text encoder's *input* token-embedding space, used by name inside a prompt, as
//! AUTOMATIC1111 and ComfyUI do. Read from A1111's `.pt` (`string_to_param`), the
//! `emb_params` safetensors both UIs load, and diffusers' `learned_embeds.bin` / safetensors
//! (`{token: vector}`). PyTorch files are read without running code.
//!
//! SDXL's embeddings (e.g. negativeXL) hold one set of vectors per text encoder, `clip_l` for
//! the first (CLIP ViT-L) and `clip_g` for the second (OpenCLIP bigG), in one safetensors file.
//!
//! A prompt names an embedding by its name as a word (`easynegative, blurry`) or ComfyUI's
//! `embedding:easynegative`; the name's place in the token sequence takes the `n` vectors.

use crate::error::{Error, Result};
use crate::torch_file;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The name prompts use (matched as a whole word, ignoring ASCII case).
    pub name: String,
    /// `[n, width]` f32 on the CPU: one input token embedding per vector (SDXL's: `clip_l`,
    /// for the first text encoder).
    pub vectors: Tensor,
    /// SDXL's `clip_g` `[n, width_2]`, for the second text encoder; None for a one-encoder
    /// embedding.
    pub vectors_2: Option<Tensor>,
}

/// A file's tensors as `(name, tensor)`, from safetensors or a `torch.save` dict.
fn tensors_of(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, "textual-inversion file not found"),
        _ => Error::file(path, format!("cannot read: {e}")),
    })?;
    let mut v: Vec<(String, Tensor)> = if torch_file::is_zip(&bytes) {
        torch_file::read_state_dict(&bytes, path)?
            .into_iter()
            .collect()
    } else {
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| {
                Error::file(
                    path,
                    format!("not a safetensors or PyTorch file ({e}); a textual-inversion embedding is an A1111 .pt, an emb_params .safetensors or a diffusers learned_embeds file"),
                )
            })?
            .into_iter()
            .collect()
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

impl TextualInversion {
    /// Loads the embedding in `path` under `name`.
    pub fn load(path: &Path, name: &str) -> Result<Self> {
        let tensors = tensors_of(path)?;
        let get = |k: &str| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t);
        if let (Some(l), Some(g)) = (get("clip_l"), get("clip_g")) {
            let vectors = Self::vectors(l, path)?;
            let vectors_2 = Self::vectors(g, path)?;
            if vectors.dim(0)? != vectors_2.dim(0)? {
                return Err(Error::file(
                    path,
                    format!(
                        "clip_l holds {} vectors and clip_g {}; an SDXL embedding has as many of each",
                        vectors.dim(0)?,
                        vectors_2.dim(0)?
                    ),
                ));
            }
            return Self::named(name, vectors, Some(vectors_2), path);
        }
        if let Some(k) = ["clip_l", "clip_g"].into_iter().find(|k| get(k).is_some()) {
            return Err(Error::file(
                path,
                format!(
                    "holds {k} without {}: an SDXL embedding needs both parts",
                    if k == "clip_l" { "clip_g" } else { "clip_l" }
                ),
            ));
        }
        // A1111 .pt: string_to_param.<token>; UIs' safetensors: emb_params; diffusers: the
        // only tensor, keyed by its token.
        let pick = get("emb_params")
            .or_else(|| {
                tensors
                    .iter()
                    .find(|(k, _)| k.starts_with("string_to_param."))
                    .map(|(_, t)| t)
            })
            .or_else(|| (tensors.len() == 1).then(|| &tensors[0].1));
        let Some(t) = pick else {
            let names: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
            return Err(Error::file(
                path,
                format!(
                    "no textual-inversion vectors (looked for emb_params, string_to_param.*, or a single tensor; found {names:?})"
                ),
            ));
        };
        Self::named(name, Self::vectors(t, path)?, None, path)
    }

    /// `t` as `[n, width]` f32 vectors (a single vector may be stored as `[width]`).
    fn vectors(t: &Tensor, path: &Path) -> Result<Tensor> {
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(Error::file(
                path,
                format!(
                    "holds {:?} values; embedding vectors are floating point",
                    t.dtype()
                ),
            ));
        }
        let vectors = match t.rank() {
            1 => t.unsqueeze(0)?,
            2 => t.clone(),
            _ => {
                return Err(Error::file(
                    path,
                    format!(
                        "holds a tensor of shape {:?}; textual-inversion vectors are [n, width]",
                        t.dims()
                    ),
                ))
            }
        };
        if vectors.elem_count() == 0 {
            return Err(Error::file(path, "holds no vectors"));
        }
        Ok(vectors.to_dtype(DType::F32)?)
    }

    fn named(name: &str, vectors: Tensor, vectors_2: Option<Tensor>, path: &Path) -> Result<Self> {
        if !name_is_valid(name) {
            return Err(Error::file(
                path,
                format!("{name:?} cannot name an embedding: use letters, digits, '_', '-', '<', '>' or '.'"),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            vectors,
            vectors_2,
        })
    }

    pub fn len(&self) -> usize {
        self.vectors.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn width(&self) -> usize {
        self.vectors.dims()[1]
    }
}

fn name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-<>.".contains(c))
}

/// `NAME=FILE`, or `FILE` (the name is the file's stem).
pub fn parse_spec(spec: &str) -> (String, std::path::PathBuf) {
    match spec.split_once('=') {
        Some((n, f)) if name_is_valid(n) => (n.to_string(), f.into()),
        _ => {
            let p = std::path::PathBuf::from(spec);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            (stem, p)
        }
    }
}

/// A piece of a prompt: text, or the embedding at this index.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece<'a> {
    Text(&'a str),
    Embedding(usize),
}

fn word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits `prompt` at each use of an embedding of `names`: the name as a whole word (ASCII
/// case ignored) or `embedding:NAME`. `embedding:` with a name not in `names` is an error.
pub fn split<'a>(prompt: &'a str, names: &[&str]) -> std::result::Result<Vec<Piece<'a>>, String> {
    let lower = prompt.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut start = 0; // where the current text piece begins
    let mut i = 0;
    while i < prompt.len() {
        if !prompt.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let before_ok = i == 0 || !prompt[..i].chars().next_back().is_some_and(word_char);
        if before_ok && lower[i..].starts_with("embedding:") {
            let rest = &prompt[i + "embedding:".len()..];
            let len = rest
                .char_indices()
                .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "_-<>.".contains(c)))
                .map_or(rest.len(), |(k, _)| k);
            let word = rest[..len].trim_end_matches('.');
            let Some(j) = names.iter().position(|n| n.eq_ignore_ascii_case(word)) else {
                return Err(format!(
                    "the prompt uses embedding:{word}, but no embedding of that name is loaded (give --embedding {word}=FILE)"
                ));
            };
            if start < i {
                out.push(Piece::Text(&prompt[start..i]));
            }
            out.push(Piece::Embedding(j));
            i += "embedding:".len() + word.len();
            start = i;
            continue;
        }
        // The longest name that matches here as a whole word (a `<token>` name, delimited by
        // its brackets, matches anywhere).
        let found = names
            .iter()
            .enumerate()
            .filter(|(_, n)| before_ok || n.starts_with('<'))
            .filter(|(_, n)| lower[i..].starts_with(&n.to_ascii_lowercase()))
            .filter(|(_, n)| {
                !prompt[i + n.len()..].chars().next().is_some_and(word_char) || n.ends_with('>')
            })
            .max_by_key(|(_, n)| n.len());
        if let Some((j, n)) = found {
            if start < i {
                out.push(Piece::Text(&prompt[start..i]));
            }
            out.push(Piece::Embedding(j));
            i += n.len();
            start = i;
            continue;
        }
        i += 1;
    }
    if start < prompt.len() {
        out.push(Piece::Text(&prompt[start..]));
    }
    Ok(out)
}
