//! AUTOMATIC1111's prompt syntax, which Stable Diffusion users write by habit: emphasis
//! `(word)` (x1.1), `[word]` (/1.1), `(word:1.3)`, nested (the factors multiply), `\(` for a
//! literal bracket, and `BREAK`, which starts a new 75-token chunk. Unmatched brackets
//! apply to the end of the prompt, as in A1111. The encoder (`pipeline`) turns the weighted
//! pieces into tokens, chunks of 75 and a scaled embedding.

/// How prompts are read: as diffusers reads them (the default: text truncated to 75
/// tokens, brackets are text), or with AUTOMATIC1111's emphasis and long-prompt chunking.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// diffusers / transformers: at most 75 tokens, the rest cut off; no emphasis.
    #[default]
    Plain,
    /// AUTOMATIC1111: (word:1.3), (word), [word], BREAK, and chunks of 75 tokens.
    A1111,
}

/// A piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text and its emphasis weight.
    Text(String, f64),
    /// `BREAK`: the next text starts a new chunk.
    Break,
}

/// One lexical token of the syntax.
#[derive(Debug, PartialEq)]
enum Lex<'a> {
    /// An escaped character (`\(` is the text "(").
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.3)`, a weight closing a round bracket.
    WeightClose(f64, &'a str),
    Close,
    CloseSquare,
    Text(&'a str),
}

fn lex(text: &str) -> Vec<Lex<'_>> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                // `\(`, `\)`, `\[`, `\]`, `\\` escape; a lone backslash is dropped (as A1111
                // drops it).
                if i + 1 < b.len() && b"()[]\\".contains(&b[i + 1]) {
                    out.push(Lex::Escaped(&text[i + 1..i + 2]));
                    i += 2;
                } else {
                    out.push(Lex::Escaped(""));
                    i += 1;
                }
            }
            b'(' => {
                out.push(Lex::Open);
                i += 1;
            }
            b'[' => {
                out.push(Lex::OpenSquare);
                i += 1;
            }
            b')' => {
                out.push(Lex::Close);
                i += 1;
            }
            b']' => {
                out.push(Lex::CloseSquare);
                i += 1;
            }
            b':' => {
                // `:` spaces, a number, spaces, `)`; otherwise a literal colon.
                let rest = &text[i + 1..];
                let t = rest.trim_start();
                let num_len = t
                    .bytes()
                    .enumerate()
                    .take_while(|&(k, c)| {
                        c.is_ascii_digit() || c == b'.' || (k == 0 && (c == b'+' || c == b'-'))
                    })
                    .count();
                let after = t[num_len..].trim_start();
                let value = t[..num_len].parse::<f64>().ok();
                match (value, after.starts_with(')')) {
                    (Some(v), true) => {
                        let end = text.len() - after.len() + 1;
                        out.push(Lex::WeightClose(v, &text[i..end]));
                        i = end;
                    }
                    _ => {
                        out.push(Lex::Text(&text[i..i + 1]));
                        i += 1;
                    }
                }
            }
            _ => {
                let end = text[i..]
                    .find(['\\', '(', '[', ')', ']', ':'])
                    .map_or(text.len(), |k| i + k);
                out.push(Lex::Text(&text[i..end]));
                i = end;
            }
        }
    }
    out
}

/// Splits text at the keyword `BREAK` (a whole word; the spaces around it go with it).
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut from = 0;
    while let Some(k) = text[from..].find("BREAK") {
        let at = from + k;
        let end = at + "BREAK".len();
        let word_before = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let word_after = text[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if word_before || word_after {
            from = end;
            continue;
        }
        let left = text[..at].trim_end_matches(char::is_whitespace);
        parts.push(&text[start..left.len().max(start)]);
        let right = end + (text[end..].len() - text[end..].trim_start().len());
        start = right;
        from = right;
    }
    parts.push(&text[start..]);
    parts
}

/// The weighted pieces of `text`, as A1111's `parse_prompt_attention` gives them: adjacent
/// pieces of equal weight merged; an empty prompt is one empty piece of weight 1.
pub fn parse(text: &str) -> Vec<Part> {
    const ROUND: f64 = 1.1;
    const SQUARE: f64 = 1.0 / 1.1;
    let mut res: Vec<Part> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Part>, from: usize, by: f64| {
        for p in &mut res[from..] {
            if let Part::Text(_, w) = p {
                *w *= by;
            }
        }
    };
    for l in lex(text) {
        match l {
            Lex::Escaped(t) => res.push(Part::Text(t.to_string(), 1.0)),
            Lex::Open => round.push(res.len()),
            Lex::OpenSquare => square.push(res.len()),
            Lex::WeightClose(v, raw) => match round.pop() {
                Some(from) => multiply(&mut res, from, v),
                None => res.push(Part::Text(raw.to_string(), 1.0)),
            },
            Lex::Close => match round.pop() {
                Some(from) => multiply(&mut res, from, ROUND),
                None => res.push(Part::Text(")".into(), 1.0)),
            },
            Lex::CloseSquare => match square.pop() {
                Some(from) => multiply(&mut res, from, SQUARE),
                None => res.push(Part::Text("]".into(), 1.0)),
            },
            Lex::Text(t) => {
                for (k, piece) in split_break(t).into_iter().enumerate() {
                    if k > 0 {
                        res.push(Part::Break);
                    }
                    res.push(Part::Text(piece.to_string(), 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push(Part::Text(String::new(), 1.0));
    }
    // Merge neighbours of equal weight.
    let mut merged: Vec<Part> = Vec::new();
    for p in res {
        match (merged.last_mut(), &p) {
            (Some(Part::Text(a, wa)), Part::Text(b, wb)) if wa == wb => a.push_str(b),
            _ => merged.push(p),
        }
    }
    merged
}

/// Whether `text` uses none of the syntax (then it encodes exactly as a plain prompt).
pub fn is_plain(text: &str) -> bool {
    !text.contains(['(', ')', '[', ']', '\\']) && !text.contains("BREAK")
}
