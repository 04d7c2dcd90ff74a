"""Token ids of the miniature world's tokenizer as transformers' CLIPTokenizer gives them.

Usage (PyTorch reference venv, outside CI): python tools/gen_mini_tokenizer_fixture.py DIR
where DIR is a tokenizer folder written by `reneg mini train` (e.g. assets/mini/clip).
Writes tests/fixtures/mini/tokenizer_ids.json.
"""
import json
import sys

from transformers import CLIPTokenizer

TEXTS = [
    "a large green circle in the centre, on a grey background",
    "a small purple circle on the right and a small orange square at the top, on a black background",
    "a large white triangle at the bottom, on a teal background, washed out",
    "blurry, noisy, washed out, colour cast, blocky",
    "low quality, worst quality, jpeg artifacts, lowres",
    "zebra photo!! of Greenish-BLUE   squares",
    "",
]

tok = CLIPTokenizer.from_pretrained(sys.argv[1])
out = {t: tok(t, padding="max_length", max_length=77, truncation=True).input_ids for t in TEXTS}
with open("tests/fixtures/mini/tokenizer_ids.json", "w") as f:
    json.dump(out, f, indent=0)
print(f"{len(tok)} tokens; wrote {len(out)} texts")
