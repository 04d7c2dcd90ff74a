#!/usr/bin/env python3
"""Write the clip-skip fixture (issue 19): diffusers' clip_skip on the sd15-tiny parity pipeline's text encoder.

Reference stack: the pinned venv of tools/gen_parity.py (torch 2.15.0, transformers 5.23.0), OUTSIDE the
repository; never used in CI. Run: /work/pyref/bin/python tools/gen_clip_skip_fixture.py

diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=k takes hidden_states[-(k + 1)] of the text
encoder (output_hidden_states=True) and applies the final layer norm. Writes
tests/fixtures/clip_skip/expected.safetensors: skip_<k> [1, 77, 32] for k = 0 (last_hidden_state), 1, 2,
for the prompt in case.json.
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(REPO, "tests/fixtures/parity/sd15-tiny/pipeline")
OUT = os.path.join(REPO, "tests/fixtures/clip_skip")
PROMPT = "a photo of an astronaut riding a horse on mars"

tok = CLIPTokenizer.from_pretrained(os.path.join(PIPE, "tokenizer"))
te = CLIPTextModel.from_pretrained(os.path.join(PIPE, "text_encoder")).eval()
ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
out = {}
with torch.no_grad():
    o = te(ids, output_hidden_states=True)
    out["skip_0"] = o.last_hidden_state.contiguous()
    for k in (1, 2):
        out[f"skip_{k}"] = te.final_layer_norm(o.hidden_states[-(k + 1)]).contiguous()
os.makedirs(OUT, exist_ok=True)
save_file(out, os.path.join(OUT, "expected.safetensors"))
with open(os.path.join(OUT, "case.json"), "w") as f:
    json.dump({"prompt": PROMPT, "layers": te.config.num_hidden_layers}, f)
