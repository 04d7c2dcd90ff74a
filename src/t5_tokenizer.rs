//! T5's tokenizer (PixArt-α's `tokenizer/`): a sentencepiece Unigram model with the nmt_nfkc
//! normalisation, `<pad>` 0, `</s>` 1, `<unk>` 2, no BOS, `</s>` appended, and `<extra_id_i>`
//! after the pieces in reverse. Read from `tokenizer.json` (transformers' fast tokenizer) by
//! the `tokenizers` crate, or from `spiece.model` alone, rebuilt into the same pipeline as
//! transformers' converter builds it (the precompiled normaliser, whitespace split, the `▁`
//! metaspace, the pieces and their scores); either gives the same ids.

use crate::error::{read_json, Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
    eos_id: u32,
    /// Where it was read from, for messages.
    source: PathBuf,
}

/// A prompt's ids and attention mask, `max_length` long.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// 1 on the pieces and `</s>`, 0 on padding.
    pub mask: Vec<u32>,
}

impl T5Tokenizer {
    /// The tokenizer of a folder: `tokenizer.json` if present, else `spiece.model` (with the
    /// number of `<extra_id_i>` from `tokenizer_config.json`'s `extra_ids`, 100 by default).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        if json.is_file() {
            Self::from_json(&json)
        } else if spiece.is_file() {
            let config = dir.join("tokenizer_config.json");
            let extra = if config.is_file() {
                let v: serde_json::Value = read_json(&config)?;
                v["extra_ids"].as_u64().unwrap_or(100) as usize
            } else {
                100
            };
            Self::from_spiece(&spiece, extra)
        } else {
            Err(Error::file(
                dir,
                "no T5 tokenizer here: it needs tokenizer.json or spiece.model (PixArt's tokenizer/ folder)",
            ))
        }
    }

    pub fn from_json(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::file(path, format!("not a tokenizers tokenizer.json: {e}")))?;
        Self::with_specials(inner, path)
    }

    /// `spiece.model` (sentencepiece's ModelProto) as transformers' T5 converter reads it.
    pub fn from_spiece(path: &Path, extra_ids: usize) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let model = spiece::parse(&bytes)
            .map_err(|e| Error::file(path, format!("not a sentencepiece model ({e})")))?;
        if model.model_type != 1 {
            return Err(Error::file(
                path,
                format!(
                    "a sentencepiece model of type {}; T5's is a Unigram (1)",
                    model.model_type
                ),
            ));
        }
        let mut vocab: Vec<(String, f64)> = model
            .pieces
            .iter()
            .map(|p| (p.piece.clone(), p.score as f64))
            .collect();
        let extras: Vec<String> = (0..extra_ids)
            .rev()
            .map(|i| format!("<extra_id_{i}>"))
            .collect();
        vocab.extend(extras.iter().map(|e| (e.clone(), 0.0)));
        let unigram =
            Unigram::from(vocab, Some(model.unk_id), model.byte_fallback).map_err(|e| {
                Error::file(path, format!("its pieces do not make a Unigram model: {e}"))
            })?;
        let mut inner = Tokenizer::new(unigram);
        if !model.charsmap.is_empty() {
            let p = Precompiled::from(&model.charsmap)
                .map_err(|e| Error::file(path, format!("its precompiled charsmap: {e}")))?;
            inner.with_normalizer(Some(p));
        }
        let prepend = if model.add_dummy_prefix {
            PrependScheme::Always
        } else {
            PrependScheme::Never
        };
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            WhitespaceSplit.into(),
            Metaspace::new('\u{2581}', prepend, true).into(),
        ])));
        // Control and unknown pieces, and the sentinels, are special: matched whole in text.
        let specials: Vec<AddedToken> = model
            .pieces
            .iter()
            .filter(|p| matches!(p.kind, 2 | 3))
            .map(|p| p.piece.clone())
            .chain(extras)
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Self::with_specials(inner, path)
    }

    fn with_specials(inner: Tokenizer, path: &Path) -> Result<Self> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::file(path, format!("has no {t} token: not a T5 tokenizer")))
        };
        Ok(Self {
            pad_id: id("<pad>")?,
            eos_id: id("</s>")?,
            inner,
            source: path.to_path_buf(),
        })
    }

    /// How many ids the tokenizer can produce (its vocabulary with the sentinels).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The pieces of `text` then `</s>`, cut to `max_length` (at most `max_length - 1`
    /// pieces, `</s>` kept) and padded with `<pad>`, as transformers'
    /// `tokenizer(text, padding="max_length", max_length=L, truncation=True)`.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Encoded> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::file(&self.source, format!("cannot tokenize {text:?}: {e}")))?;
        let mut ids: Vec<u32> = enc
            .get_ids()
            .iter()
            .copied()
            .take(max_length.saturating_sub(1))
            .collect();
        ids.push(self.eos_id);
        let real = ids.len().min(max_length);
        ids.truncate(max_length);
        let mut mask = vec![1; real];
        ids.resize(max_length, self.pad_id);
        mask.resize(max_length, 0);
        Ok(Encoded { ids, mask })
    }
}

/// sentencepiece's `ModelProto`, the fields a Unigram tokenizer needs, read from its protobuf
/// wire format (pieces: field 1; trainer spec: 2; normaliser spec: 3).
mod spiece {
    pub struct Piece {
        pub piece: String,
        pub score: f32,
        /// 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
        pub kind: u64,
    }

    pub struct Model {
        pub pieces: Vec<Piece>,
        pub model_type: u64,
        pub unk_id: usize,
        pub byte_fallback: bool,
        pub charsmap: Vec<u8>,
        pub add_dummy_prefix: bool,
    }

    /// A field: its number and its value (a varint, 32 or 64 fixed bits, or bytes).
    enum Value<'a> {
        Varint(u64),
        Fixed32(u32),
        Bytes(&'a [u8]),
    }

    fn varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at).ok_or("truncated varint")?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn fields(b: &[u8]) -> Result<Vec<(u64, Value<'_>)>, String> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let key = varint(b, &mut at)?;
            let value = match key & 7 {
                0 => Value::Varint(varint(b, &mut at)?),
                1 => {
                    at += 8;
                    Value::Varint(0)
                }
                2 => {
                    let len = varint(b, &mut at)? as usize;
                    let end = at
                        .checked_add(len)
                        .filter(|&e| e <= b.len())
                        .ok_or("truncated field")?;
                    let v = Value::Bytes(&b[at..end]);
                    at = end;
                    v
                }
                5 => {
                    let raw = b.get(at..at + 4).ok_or("truncated fixed32")?;
                    at += 4;
                    Value::Fixed32(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
                }
                w => return Err(format!("wire type {w} is not protobuf's")),
            };
            if at > b.len() {
                return Err("truncated field".into());
            }
            out.push((key >> 3, value));
        }
        Ok(out)
    }

    pub fn parse(b: &[u8]) -> Result<Model, String> {
        // proto2 defaults: Unigram, unk 0, no byte fallback, a dummy prefix.
        let mut m = Model {
            pieces: Vec::new(),
            model_type: 1,
            unk_id: 0,
            byte_fallback: false,
            charsmap: Vec::new(),
            add_dummy_prefix: true,
        };
        for (field, value) in fields(b)? {
            match (field, value) {
                (1, Value::Bytes(p)) => {
                    let mut piece = Piece {
                        piece: String::new(),
                        score: 0.0,
                        kind: 1,
                    };
                    for (f, v) in fields(p)? {
                        match (f, v) {
                            (1, Value::Bytes(s)) => {
                                piece.piece = String::from_utf8(s.to_vec())
                                    .map_err(|_| "a piece is not UTF-8")?
                            }
                            (2, Value::Fixed32(x)) => piece.score = f32::from_bits(x),
                            (3, Value::Varint(k)) => piece.kind = k,
                            _ => {}
                        }
                    }
                    m.pieces.push(piece);
                }
                (2, Value::Bytes(t)) => {
                    for (f, v) in fields(t)? {
                        match (f, v) {
                            (3, Value::Varint(k)) => m.model_type = k,
                            (35, Value::Varint(k)) => m.byte_fallback = k != 0,
                            (40, Value::Varint(k)) => m.unk_id = k as usize,
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(n)) => {
                    for (f, v) in fields(n)? {
                        match (f, v) {
                            (2, Value::Bytes(c)) => m.charsmap = c.to_vec(),
                            (3, Value::Varint(k)) => m.add_dummy_prefix = k != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces".into());
        }
        if m.unk_id >= m.pieces.len() {
            return Err(format!(
                "unk_id {} is past its {} pieces",
                m.unk_id,
                m.pieces.len()
            ));
        }
        Ok(m)
    }
}
