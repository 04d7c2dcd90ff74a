#!/usr/bin/env python3
"""Write the textual-inversion fixtures (issue 19): a community negative embedding in both of its
formats, and the prompt embeddings transformers gives when it is used inside prompts.

Reference stack: the pinned venv of tools/gen_parity.py (torch 2.15.0, transformers 5.23.0, safetensors),
OUTSIDE the repository; never used in CI. Run (CPU, seconds):

    /work/pyref/bin/python tools/gen_ti_fixtures.py [--out tests/fixtures/ti]

The model is the sd15-tiny parity pipeline's text encoder and tokenizer (hidden size 32).
What it writes under --out:

    tinyneg.pt             A1111's format: torch.save({"string_to_token": {"*": 265},
                           "string_to_param": {"*": Parameter(v)}, "name": "tinyneg", "step": 500,
                           "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny"}); v = 3 vectors of width 32
    tinyneg.safetensors    the safetensors format A1111 and ComfyUI also load: {"emb_params": v}
    learned_embeds.bin     diffusers' format: torch.save({"<tinypos>": w}), w one vector of width 32
    wide.safetensors       {"emb_params": 2 vectors of width 48}: the wrong width for this model
    expected.safetensors   prompt_embeds_<i>: [1, 77, 32] last hidden state of prompt i
    case.json              the prompts (with the names as a user writes them) and what was encoded

The reference uses transformers' own mechanism (diffusers' load_textual_inversion does the same): each vector
becomes an added token of the tokenizer with its row in the resized token-embedding table, and the name in the
prompt is replaced by those tokens. reneg must give the same last hidden state.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(REPO, "tests/fixtures/parity/sd15-tiny/pipeline")

PROMPTS = [
    "tinyneg",
    "a photo of a cat, tinyneg",
    "tinyneg, blurry, tinyneg, low quality",
    "embedding:tinyneg and a dog",
    "a <tinypos> in the snow, tinyneg",
    "a photo of a cat",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/ti"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tok = CLIPTokenizer.from_pretrained(os.path.join(PIPE, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(PIPE, "text_encoder")).eval()
    width = te.config.hidden_size
    g = torch.Generator().manual_seed(1901)
    v = torch.randn(3, width, generator=g) * 0.5
    w = torch.randn(width, generator=g) * 0.5
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(v.clone())},
            "name": "tinyneg",
            "step": 500,
            "sd_checkpoint": "0123abcd",
            "sd_checkpoint_name": "tiny",
        },
        os.path.join(a.out, "tinyneg.pt"),
    )
    save_file({"emb_params": v.clone().contiguous()}, os.path.join(a.out, "tinyneg.safetensors"))
    torch.save({"<tinypos>": w.clone()}, os.path.join(a.out, "learned_embeds.bin"))
    save_file({"emb_params": torch.randn(2, 48, generator=g)}, os.path.join(a.out, "wide.safetensors"))

    # transformers' mechanism: added tokens with their own rows.
    names = [f"<ti_{k}>" for k in range(3)] + ["<ti_pos>"]
    tok.add_tokens(names)
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        for k, name in enumerate(names[:3]):
            emb[tok.convert_tokens_to_ids(name)] = v[k]
        emb[tok.convert_tokens_to_ids("<ti_pos>")] = w
    out = {}
    cases = []
    for i, p in enumerate(PROMPTS):
        text = p.replace("embedding:tinyneg", "tinyneg").replace("<tinypos>", "<ti_pos>")
        text = text.replace("tinyneg", "<ti_0><ti_1><ti_2>")
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            h = te(ids).last_hidden_state
        out[f"prompt_embeds_{i}"] = h.contiguous()
        cases.append({"prompt": p, "reference_text": text, "ids": ids[0].tolist()})
    save_file(out, os.path.join(a.out, "expected.safetensors"))
    with open(os.path.join(a.out, "case.json"), "w") as f:
        json.dump(
            {
                "model": "tests/fixtures/parity/sd15-tiny/pipeline",
                "embeddings": {"tinyneg": ["tinyneg.pt", "tinyneg.safetensors"], "<tinypos>": ["learned_embeds.bin"]},
                "prompts": cases,
                "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
