//! CLIP's byte-level BPE tokenizer, matching transformers' `CLIPTokenizer` (transformers 5.23):
//! NFC normalisation, whitespace collapsed, lower case, CLIP's word regex, byte-to-unicode
//! mapping, BPE with the `</w>` end-of-word marker, BOS/EOS, truncation and padding to 77.
//!
//! Reads `tokenizer.json`, or `vocab.json` + `merges.txt` (the original SD1.5 layout); the real
//! vocabulary (OpenAI's `bpe_simple_vocab_16e6.txt.gz`, MIT) is embedded for use without files.

use crate::error::{read_json, Error, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use unicode_normalization::UnicodeNormalization;

const EMBEDDED_BPE: &[u8] = include_bytes!("../assets/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz");
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    /// Merge ranks keyed `left \0 right` (so a lookup needs no allocation: see [`pair_key`]).
    ranks: HashMap<String, usize>,
    /// Special tokens matched verbatim in the input text before normalisation.
    specials: Vec<(String, u32)>,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    byte_to_char: [char; 256],
    word_re: Regex,
    byte_level_re: Regex,
    /// open_clip's tokenizer unescapes HTML entities (twice) before anything else.
    unescape_html: bool,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2's reversible map from bytes to printable unicode characters.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut map = ['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        map[*b as usize] = char::from_u32(c).expect("valid code point");
    }
    map
}

impl ClipTokenizer {
    fn build(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad_token: &str,
        added: &[String],
        max_len: usize,
        source: &Path,
    ) -> Result<Self> {
        let id = |tok: &str| {
            encoder
                .get(tok)
                .copied()
                .ok_or_else(|| Error::file(source, format!("vocabulary lacks the token {tok:?}")))
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(pad_token)?);
        // Added tokens (BOS, EOS, the pad token, any others the files declare) are matched
        // verbatim in the raw text, as transformers does: with SD2's pad "!" every "!" is id 0.
        let mut specials: Vec<(String, u32)> = vec![(BOS.into(), bos), (EOS.into(), eos)];
        for tok in std::iter::once(pad_token).chain(added.iter().map(String::as_str)) {
            if !specials.iter().any(|(s, _)| s == tok) {
                specials.push((tok.to_string(), id(tok)?));
            }
        }
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, (a, b)) in merges.into_iter().enumerate() {
            // A duplicated merge takes its last rank, as the Python tokenizers' dict does.
            ranks.insert(pair_key(&mut String::new(), &a, &b).to_string(), i);
        }
        let word_re = Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("valid regex");
        // The ByteLevel pre-tokenizer's GPT-2 split, applied inside each CLIP piece (pieces
        // hold no whitespace, so its whitespace alternatives are left out).
        let byte_level_re = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+")
            .expect("valid regex");
        Ok(Self {
            encoder,
            ranks,
            specials,
            bos,
            eos,
            pad,
            max_len,
            byte_to_char: bytes_to_unicode(),
            word_re,
            byte_level_re,
            unescape_html: false,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The real CLIP vocabulary, embedded in the library. `pad_token`: `"<|endoftext|>"` as
    /// SD1.x, or `"!"` as SD2.x.
    pub fn embedded(pad_token: &str) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(EMBEDDED_BPE)
            .read_to_string(&mut text)
            .map_err(|e| Error::file("<embedded vocabulary>", e.to_string()))?;
        // As OpenAI CLIP: skip the version line, keep 49152 - 256 - 2 merges.
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(49152 - 256 - 2)
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        // OpenAI's order: the printable bytes first, then the remapped ones (by code point).
        let mut byte_chars: Vec<char> = bytes_to_unicode().to_vec();
        byte_chars.sort_unstable();
        let mut vocab: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(byte_chars.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(BOS.into());
        vocab.push(EOS.into());
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::build(
            encoder,
            merges,
            pad_token,
            &[],
            77,
            Path::new("<embedded vocabulary>"),
        )
    }

    /// open_clip's tokenizer (HPSv2): the embedded vocabulary, padding with id 0 (not a
    /// token), HTML entities unescaped. open_clip also runs `ftfy.fix_text`, which is not
    /// reproduced: it changes only mis-encoded text (mojibake), full-width forms and ligatures.
    pub fn open_clip() -> Result<Self> {
        let mut t = Self::embedded(EOS)?;
        t.pad = 0;
        t.unescape_html = true;
        Ok(t)
    }

    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`; the pad token and maximum length from `tokenizer_config.json` /
    /// `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "tokenizer folder not found"));
        }
        let config: Option<Value> = optional_json(&dir.join("tokenizer_config.json"))?;
        let special: Option<Value> = optional_json(&dir.join("special_tokens_map.json"))?;
        let pad = [config.as_ref(), special.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|v| token_content(v.get("pad_token")?))
            .unwrap_or_else(|| EOS.to_string());
        let max_len = config
            .as_ref()
            .and_then(|c| c.get("model_max_length")?.as_f64())
            .filter(|m| (2.0..=77.0).contains(m))
            .map(|m| m as usize)
            .unwrap_or(77);

        let mut added: Vec<String> = config
            .as_ref()
            .and_then(|c| c.get("added_tokens_decoder")?.as_object().cloned())
            .map(|m| m.values().filter_map(token_content).collect())
            .unwrap_or_default();
        let tj = dir.join("tokenizer.json");
        let (encoder, merges, source) = if tj.is_file() {
            let v: Value = read_json(&tj)?;
            let (enc, merges, more) = parse_tokenizer_json(&v).ok_or_else(|| {
                Error::file(
                    &tj,
                    "not a BPE tokenizer.json (expected model.vocab and model.merges)",
                )
            })?;
            added.extend(more);
            (enc, merges, tj)
        } else {
            let vj = dir.join("vocab.json");
            let mt = dir.join("merges.txt");
            if !vj.is_file() || !mt.is_file() {
                return Err(Error::file(
                    dir,
                    "tokenizer folder needs tokenizer.json, or vocab.json and merges.txt",
                ));
            }
            let encoder: HashMap<String, u32> = read_json(&vj)?;
            let text = std::fs::read_to_string(&mt)
                .map_err(|e| Error::file(&mt, format!("cannot read: {e}")))?;
            let merges = text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| {
                    l.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| Error::file(&mt, format!("malformed merge line {l:?}")))
                })
                .collect::<Result<Vec<_>>>()?;
            (encoder, merges, mt)
        };
        Self::build(encoder, merges, &pad, &added, max_len, &source)
    }

    /// The same tokenizer padding with `id` (open_clip pads with 0, whatever the vocabulary).
    pub fn with_pad_id(mut self, id: u32) -> Self {
        self.pad = id;
        self
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// transformers' `CLIPTokenizer(text, padding="max_length", truncation=True)`:
    /// `[BOS, tokens..., EOS, PAD...]`, exactly `max_len` ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos];
        ids.extend(self.tokens(text).into_iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        ids
    }

    /// The BPE ids of `text`, without BOS/EOS, padding or truncation.
    pub fn tokens(&self, text: &str) -> Vec<u32> {
        let mut out = vec![];
        // Special tokens are matched in the raw text, the pieces between them normalised.
        let mut rest = text;
        while !rest.is_empty() {
            // Leftmost match, the longest at that position.
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by_key(|&(p, len, _)| (p, std::cmp::Reverse(len)));
            match next {
                Some((p, len, id)) => {
                    self.encode_plain(&rest[..p], &mut out);
                    out.push(id);
                    rest = &rest[p + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let text = if self.unescape_html {
            unescape_html(&unescape_html(text))
        } else {
            text.to_string()
        };
        let normalized: String = text.nfc().collect::<String>();
        // Per-character lower case (no context rules such as Greek final sigma), as tokenizers.
        let normalized: String = normalized
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .flat_map(char::to_lowercase)
            .collect();
        for piece in self.word_re.find_iter(&normalized) {
            for m in self.byte_level_re.find_iter(piece.as_str()) {
                let word: String = m
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_to_char[b as usize])
                    .collect();
                out.extend(self.bpe(&word));
            }
        }
    }

    fn bpe(&self, word: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().expect("cache lock").get(word) {
            return ids.clone();
        }
        let ids: Vec<u32> = bpe_merge(word, &self.ranks)
            .into_iter()
            .map(|p| self.encoder.get(p.as_str()).copied().unwrap_or(self.eos))
            .collect();
        let mut cache = self.cache.lock().expect("cache lock");
        // Bounded: a stream of distinct words (long prompts without spaces, random text) must
        // not grow it without end. Cleared whole; the common words come back at once.
        if cache.len() >= CACHE_WORDS {
            cache.clear();
        }
        cache.insert(word.to_string(), ids.clone());
        ids
    }
}

/// Words the BPE cache holds at most.
const CACHE_WORDS: usize = 1 << 16;

/// `left \0 right` in `buf` (cleared first): the key of a merge in `ranks`.
fn pair_key<'a>(buf: &'a mut String, left: &str, right: &str) -> &'a str {
    buf.clear();
    buf.push_str(left);
    buf.push('\0');
    buf.push_str(right);
    buf
}

/// CLIP's BPE of one word (the last symbol carries `</w>`): repeatedly merges the adjacent pair
/// of lowest rank, the leftmost first among equal ranks (the reference merges every occurrence
/// of the chosen pair left to right, which is the same sequence of merges). A heap of candidate
/// pairs over a linked list of symbols: O(n log n) in the word's length, where rescanning all
/// pairs after each merge was quadratic (and cloned two strings per lookup).
fn bpe_merge(word: &str, ranks: &HashMap<String, usize>) -> Vec<String> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let text = format!("{word}</w>");
    // Symbols as byte ranges of `text`; the last one takes the `</w>`.
    let start: Vec<usize> = word.char_indices().map(|(i, _)| i).collect();
    if start.is_empty() {
        return vec![];
    }
    let n = start.len();
    let mut end: Vec<usize> = start[1..].to_vec();
    end.push(text.len());
    let mut next: Vec<usize> = (1..=n).collect(); // n = none
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // usize::MAX = none
    let mut alive = vec![true; n];
    let mut buf = String::new();
    // (rank, left symbol, left end, right end): stale once either symbol has changed.
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<_>,
                buf: &mut String,
                l: usize,
                r: usize,
                s: &[usize],
                e: &[usize]| {
        if let Some(&rank) = ranks.get(pair_key(buf, &text[s[l]..e[l]], &text[s[r]..e[r]])) {
            heap.push(Reverse((rank, l, e[l], e[r])));
        }
    };
    for i in 0..n - 1 {
        push(&mut heap, &mut buf, i, i + 1, &start, &end);
    }
    while let Some(Reverse((_, l, l_end, r_end))) = heap.pop() {
        let r = next[l];
        if !alive[l] || r >= n || end[l] != l_end || end[r] != r_end {
            continue;
        }
        // Merge r into l.
        end[l] = end[r];
        alive[r] = false;
        next[l] = next[r];
        if next[r] < n {
            prev[next[r]] = l;
        }
        if prev[l] != usize::MAX {
            push(&mut heap, &mut buf, prev[l], l, &start, &end);
        }
        if next[l] < n {
            push(&mut heap, &mut buf, l, next[l], &start, &end);
        }
    }
    let mut out = vec![];
    let mut i = 0;
    while i < n {
        out.push(text[start[i]..end[i]].to_string());
        i = next[i];
    }
    out
}

/// Python's `html.unescape` for the entities prompts use: named basics and numeric forms.
fn unescape_html(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    static ENTITY: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = ENTITY.get_or_init(|| {
        Regex::new(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|amp|lt|gt|quot|apos|nbsp);?").expect("valid regex")
    });
    re.replace_all(s, |c: &regex::Captures| {
        let e = &c[1];
        let ch = match e {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ if e.starts_with("#x") || e.starts_with("#X") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            _ => e[1..].parse().ok().and_then(char::from_u32),
        };
        ch.map(String::from).unwrap_or_else(|| c[0].to_string())
    })
    .into_owned()
}

fn optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token given as a string or as `{"content": ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// `model.vocab` and `model.merges` of a tokenizers BPE file (merges as "a b" or ["a", "b"]).
type Parsed = (HashMap<String, u32>, Vec<(String, String)>, Vec<String>);

fn parse_tokenizer_json(v: &Value) -> Option<Parsed> {
    let model = v.get("model")?;
    let mut encoder: HashMap<String, u32> = model
        .get("vocab")?
        .as_object()?
        .iter()
        .filter_map(|(k, id)| Some((k.clone(), id.as_u64()? as u32)))
        .collect();
    let mut added = vec![];
    if let Some(tokens) = v.get("added_tokens").and_then(|a| a.as_array()) {
        for t in tokens {
            if let (Some(c), Some(id)) = (t.get("content")?.as_str(), t.get("id")?.as_u64()) {
                encoder.insert(c.to_string(), id as u32);
                added.push(c.to_string());
            }
        }
    }
    let merges = model
        .get("merges")?
        .as_array()?
        .iter()
        .filter_map(|m| match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(p) if p.len() == 2 => {
                Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string()))
            }
            _ => None,
        })
        .collect();
    Some((encoder, merges, added))
}
