//! How a prompt becomes CLIP encoder inputs, for every CLIP encoder reneg runs (SD's one,
//! SDXL's two): names of textual-inversion embeddings take their vectors' places, and with
//! A1111's syntax a prompt is cut into chunks of 75 tokens, `BREAK` starts a chunk and the
//! emphasis weighs each token. Which hidden state an encoder reads from a chunk is the
//! family's business; what the chunks are is decided here once.

use crate::embedding::textual_inversion::{split, Piece, TextualInversion};
use crate::error::{Error, Result};
use crate::prompt_syntax::{is_plain, parse, Part, PromptSyntax};
use crate::tokenizer::ClipTokenizer;
use candle_core::{Device, Tensor};

/// One encoder input of `max_len` tokens: BOS, the chunk's tokens, EOS, padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    /// Each position's emphasis (1 for BOS, EOS and padding).
    pub weights: Vec<f32>,
    /// Positions whose input embedding is an inversion's vector: (position, index of the
    /// inversion in the list given to [`chunks`], index of its vector).
    pub vectors: Vec<(usize, usize, usize)>,
}

impl Chunk {
    /// A chunk of a tokenizer's ids as they are, unweighted.
    pub fn plain(ids: Vec<u32>) -> Self {
        Self {
            weights: vec![1.0; ids.len()],
            ids,
            vectors: Vec::new(),
        }
    }

    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.ids.clone(),
            (1, self.ids.len()),
            device,
        )?)
    }

    /// The (position, vector) overrides of the input embeddings, taking each inversion's
    /// vectors for this encoder from `vectors_of` (None: the inversion has none for it).
    pub fn overrides<'a>(
        &self,
        vectors_of: impl Fn(&'a TextualInversion) -> Option<&'a Tensor>,
        inversions: &'a [TextualInversion],
    ) -> Result<Vec<(usize, Tensor)>> {
        self.vectors
            .iter()
            .map(|&(pos, j, k)| {
                let ti = &inversions[j];
                let v = vectors_of(ti).ok_or_else(|| {
                    Error::Invalid(format!(
                        "the embedding {} has no vectors for this text encoder",
                        ti.name
                    ))
                })?;
                Ok((pos, v.get(k)?))
            })
            .collect()
    }

    /// Whether every weight is 1 (no emphasis to apply).
    pub fn unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }

    /// A1111's emphasis on an encoder's output `z` `[1, n, D]` for this chunk: each token's
    /// row scaled by its weight, then the whole chunk back to its mean.
    pub fn emphasize(&self, z: Tensor) -> Result<Tensor> {
        if self.unweighted() {
            return Ok(z);
        }
        let n = self.weights.len();
        let w =
            Tensor::from_vec(self.weights.clone(), (1, n, 1), z.device())?.to_dtype(z.dtype())?;
        let before = z.mean_all()?;
        let scaled = z.broadcast_mul(&w)?;
        let after = scaled.mean_all()?;
        Ok(scaled.broadcast_mul(&(before / after)?)?)
    }
}

/// How a prompt is to be encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoding {
    /// As the tokenizer alone reads it (no names, no syntax that changes anything): diffusers'
    /// way, past 75 tokens cut off.
    Plain,
    /// Chunks to encode one by one and concatenate along the sequence.
    Chunks(Vec<Chunk>),
}

/// The inversions' names, as [`split`] takes them.
pub fn names(inversions: &[TextualInversion]) -> Vec<&str> {
    inversions.iter().map(|t| t.name.as_str()).collect()
}

/// An error if `text` uses `embedding:NAME` with a name not among `inversions`.
pub fn check(text: &str, inversions: &[TextualInversion]) -> Result<()> {
    split(text, &names(inversions))
        .map(|_| ())
        .map_err(Error::Invalid)
}

/// The encoding of `text` for `tok`. With [`PromptSyntax::Plain`] one chunk cut at 75 tokens,
/// as the tokenizer cuts a plain prompt; with `A1111` as AUTOMATIC1111 chunks and weighs it.
/// A text without names, and (A1111) without syntax or more than 75 tokens, is
/// [`Encoding::Plain`], encoded exactly as transformers does.
pub fn chunks(
    text: &str,
    tok: &ClipTokenizer,
    inversions: &[TextualInversion],
    syntax: PromptSyntax,
) -> Result<Encoding> {
    let a1111 = syntax == PromptSyntax::A1111;
    let names = names(inversions);
    let chunk_len = tok.max_len() - 2;
    // Split even without embeddings loaded: `embedding:NAME` must name a loaded one.
    let has_names = split(text, &names)
        .map_err(Error::Invalid)?
        .iter()
        .any(|p| matches!(p, Piece::Embedding(_)));
    if !has_names && (!a1111 || (is_plain(text) && tok.tokens(text).len() <= chunk_len)) {
        return Ok(Encoding::Plain);
    }
    let parts = if a1111 {
        parse(text)
    } else {
        vec![Part::Text(text.to_string(), 1.0)]
    };
    // Tokens with their weights and (for embeddings) vectors; None marks BREAK.
    let mut items: Vec<Option<Token>> = Vec::new();
    for part in parts {
        match part {
            Part::Break => items.push(None),
            Part::Text(t, w) => {
                for piece in split(&t, &names).map_err(Error::Invalid)? {
                    match piece {
                        Piece::Text(t) => {
                            items.extend(tok.tokens(t).into_iter().map(|id| Some((id, w, None))))
                        }
                        Piece::Embedding(j) => {
                            // A placeholder id; its input embedding is replaced.
                            items.extend(
                                (0..inversions[j].len())
                                    .map(|k| Some((tok.bos_id(), w, Some((j, k))))),
                            )
                        }
                    }
                }
            }
        }
    }
    let token_chunks = if a1111 {
        chunk_tokens(items, chunk_len, tok.tokens(",").first().copied())
    } else {
        vec![items.into_iter().flatten().take(chunk_len).collect()]
    };
    let chunks = token_chunks
        .into_iter()
        .map(|chunk| {
            let mut ids = vec![tok.bos_id()];
            let mut weights = vec![1f32];
            let mut vectors = Vec::new();
            for (id, w, v) in chunk {
                if let Some((j, k)) = v {
                    vectors.push((ids.len(), j, k));
                }
                ids.push(id);
                weights.push(w as f32);
            }
            ids.push(tok.eos_id());
            ids.resize(tok.max_len(), tok.pad_id());
            weights.resize(tok.max_len(), 1.0);
            Chunk {
                ids,
                weights,
                vectors,
            }
        })
        .collect();
    Ok(Encoding::Chunks(chunks))
}

/// A token: id, emphasis, and the (inversion, vector) it stands for.
type Token = (u32, f64, Option<(usize, usize)>);

/// A1111's chunking: tokens into chunks of at most `len`. A full chunk ends after its last
/// comma when that comma is within the last 20 tokens (the rest moves to the next chunk);
/// `None` (BREAK) ends a chunk; a textual-inversion embedding's vectors stay in one chunk.
/// An empty prompt is one empty chunk.
fn chunk_tokens(items: Vec<Option<Token>>, len: usize, comma: Option<u32>) -> Vec<Vec<Token>> {
    const COMMA_BACKTRACK: usize = 20;
    let mut chunks: Vec<Vec<Token>> = Vec::new();
    let mut chunk: Vec<Token> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut i = 0;
    while i < items.len() {
        let Some(item) = items[i] else {
            chunks.push(std::mem::take(&mut chunk));
            last_comma = None;
            i += 1;
            continue;
        };
        if Some(item.0) == comma && item.2.is_none() {
            last_comma = Some(chunk.len());
        } else if chunk.len() == len {
            if let Some(c) = last_comma.filter(|&c| len - c <= COMMA_BACKTRACK) {
                let moved = chunk.split_off(c + 1);
                chunks.push(std::mem::replace(&mut chunk, moved));
                last_comma = None;
            }
        }
        if chunk.len() == len {
            chunks.push(std::mem::take(&mut chunk));
            last_comma = None;
        }
        if item.2.is_some() {
            // An embedding's vectors are not split across chunks.
            let run = items[i..]
                .iter()
                .take_while(|t| t.is_some_and(|t| t.2.is_some()))
                .count()
                .min(len);
            if chunk.len() + run > len {
                chunks.push(std::mem::take(&mut chunk));
                last_comma = None;
            }
            chunk.extend(items[i..i + run].iter().flatten());
            i += run;
            continue;
        }
        chunk.push(item);
        i += 1;
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// Prompt embeddings `[b_i, L_i, D]` of different lengths (chunk counts) made equal by
/// appending `empty` (the empty prompt's chunk, `[1, 77, D]`, made only when needed) to the
/// shorter ones, as A1111 pads the shorter of prompt and negative, and concatenated along the
/// batch: `[sum b_i, L, D]`.
pub fn pad_and_cat(contexts: &[&Tensor], empty: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    let lengths = contexts
        .iter()
        .map(|t| t.dim(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let longest = lengths.iter().copied().max().unwrap_or(0);
    if lengths.iter().all(|&l| l == longest) {
        return Ok(Tensor::cat(contexts, 0)?);
    }
    let empty = empty()?;
    let chunk = empty.dim(1)?;
    let padded = contexts
        .iter()
        .map(|t| {
            let (b, l, _) = t.dims3()?;
            if l == longest {
                return Ok((*t).clone());
            }
            if (longest - l) % chunk != 0 {
                return Err(Error::Invalid(format!(
                    "prompt embeddings of {l} and {longest} tokens cannot be padded to one length in chunks of {chunk}"
                )));
            }
            let fill = empty
                .to_dtype(t.dtype())?
                .repeat((b, (longest - l) / chunk, 1))?;
            Ok(Tensor::cat(&[*t, &fill], 1)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&padded, 0)?)
}
