#!/usr/bin/env python3
"""Write the long-prompt and emphasis fixtures (issue 19): prompt embeddings as AUTOMATIC1111 computes them,
from transformers' tokenizer and text encoder.

Reference stack: the pinned venv of tools/gen_parity.py (torch 2.15.0, transformers 5.23.0), OUTSIDE the
repository; never used in CI. Run (CPU, seconds):

    /work/pyref/bin/python tools/gen_prompt_syntax_fixtures.py [--out tests/fixtures/prompt_syntax]

The model is the sd15-tiny parity pipeline's text encoder and tokenizer. This file implements A1111's
procedure as its documentation and its modules/prompt_parser.py and sd_hijack_clip.py describe it, written
afresh here (not copied):
  - parse_prompt_attention: "(x)" multiplies by 1.1, "[x]" divides by 1.1, "(x:w)" multiplies by w, nested
    factors multiply, unmatched brackets apply to the end, "\\(" is a literal bracket, a lone backslash is
    dropped, BREAK (a whole word) separates chunks; adjacent pieces of equal weight are merged;
  - tokenize each piece without BOS/EOS; fill chunks of 75 tokens; when a chunk is full and the last comma
    is within its last 20 tokens, the tokens after that comma move to the next chunk; BREAK closes a chunk;
    each chunk is BOS + tokens + EOS, padded with the tokenizer's pad token to 77;
  - encode each chunk; z = z * weight per token (BOS, EOS and padding weigh 1); z = z * (mean before / mean
    after); concatenate the chunks along the sequence.

Writes expected.safetensors (embeds_<i>: [1, 77 k, 32]) and case.json (prompts, the parsed pieces, chunk
token ids and weights).
"""
import argparse
import json
import os
import re

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(REPO, "tests/fixtures/parity/sd15-tiny/pipeline")

LONG = ", ".join(
    f"a {c} {s} with {t} details" for c, s, t in [
        ("red", "house", "fine"), ("blue", "car", "sharp"), ("green", "tree", "soft"), ("yellow", "bird", "vivid"),
        ("white", "cloud", "subtle"), ("black", "cat", "crisp"), ("orange", "sunset", "warm"), ("purple", "flower", "rich"),
        ("grey", "stone", "rough"), ("pink", "shell", "smooth"), ("brown", "dog", "furry"), ("silver", "moon", "pale"),
        ("golden", "field", "bright"), ("dark", "forest", "deep"),
    ]
)
PROMPTS = [
    "a photo of a cat",
    "a (red:1.3) cat, [blurry], ((sharp focus))",
    "masterpiece, (best quality:1.2), [[low detail]], \\(literal brackets\\), (unclosed emphasis",
    "a cat BREAK a dog in the snow",
    LONG,
    "(" + LONG + ":0.8)",
    "worst quality, (low quality:1.4), BREAK, " + LONG,
    "",
]


def parse(text):
    res = []
    rounds, squares = [], []

    def mul(start, by):
        for p in res[start:]:
            if p[1] != -1:
                p[1] *= by

    pattern = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
    for m in pattern.finditer(text):
        t, w = m.group(0), m.group(1)
        if t.startswith("\\"):
            res.append([t[1:], 1.0])
        elif t == "(":
            rounds.append(len(res))
        elif t == "[":
            squares.append(len(res))
        elif w is not None and rounds:
            mul(rounds.pop(), float(w))
        elif t == ")" and rounds:
            mul(rounds.pop(), 1.1)
        elif t == "]" and squares:
            mul(squares.pop(), 1 / 1.1)
        else:
            for k, part in enumerate(re.split(r"\s*\bBREAK\b\s*", t)):
                if k > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for s in rounds:
        mul(s, 1.1)
    for s in squares:
        mul(s, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1] and res[i][1] != -1:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def chunks_of(tok, parsed):
    comma = tok(",", add_special_tokens=False).input_ids[0]
    chunks, chunk, last_comma = [], [], -1

    def close():
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for text, w in parsed:
        if text == "BREAK" and w == -1:
            close()
            continue
        for t in tok(text, add_special_tokens=False).input_ids:
            if t == comma:
                last_comma = len(chunk)
            elif len(chunk) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                moved = chunk[last_comma + 1:]
                chunk = chunk[: last_comma + 1]
                close()
                chunk = moved
            if len(chunk) == 75:
                close()
            chunk.append((t, w))
    if chunk or not chunks:
        close()
    return chunks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/prompt_syntax"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tok = CLIPTokenizer.from_pretrained(os.path.join(PIPE, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(PIPE, "text_encoder")).eval()
    out, cases = {}, []
    for i, p in enumerate(PROMPTS):
        parsed = parse(p)
        zs, meta = [], []
        for ch in chunks_of(tok, parsed):
            ids = [tok.bos_token_id] + [t for t, _ in ch] + [tok.eos_token_id]
            ws = [1.0] + [w for _, w in ch] + [1.0]
            ids += [tok.pad_token_id] * (77 - len(ids))
            ws += [1.0] * (77 - len(ws))
            with torch.no_grad():
                z = te(torch.tensor([ids])).last_hidden_state
            before = z.mean()
            z = z * torch.tensor(ws).reshape(1, 77, 1)
            z = z * (before / z.mean())
            zs.append(z)
            meta.append({"ids": ids, "weights": ws})
        out[f"embeds_{i}"] = torch.cat(zs, 1).contiguous()
        cases.append({"prompt": p, "parsed": parsed, "chunks": meta})
    save_file(out, os.path.join(a.out, "expected.safetensors"))
    with open(os.path.join(a.out, "case.json"), "w") as f:
        json.dump({"model": "tests/fixtures/parity/sd15-tiny/pipeline", "prompts": cases,
                   "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}, f)


if __name__ == "__main__":
    main()
