# Distances between the text encoder's final features of a caption and of the same caption with one
# word changed (docs/mini-world-v4.md, diagnosis point 2). Usage: te.py PIPELINE_DIR
import torch, sys
from transformers import CLIPTextModel, CLIPTokenizer

BASE = "a large red circle on the left, on a grey background"
VARIANTS = {'pos right': "a large red circle on the right, on a grey background",
            'pos top': "a large red circle at the top, on a grey background",
            'colour blue': "a large blue circle on the left, on a grey background",
            'shape square': "a large red square on the left, on a grey background",
            'size small': "a small red circle on the left, on a grey background",
            'bg teal': "a large red circle on the left, on a teal background"}


def load(pipeline):
    """The pipeline's text encoder (eval mode) and tokenizer."""
    te = CLIPTextModel.from_pretrained(pipeline + '/text_encoder').eval()
    return te, CLIPTokenizer.from_pretrained(pipeline + '/tokenizer')


def ids_of(tok, s):
    return tok(s, padding='max_length', max_length=tok.model_max_length, truncation=True,
               return_tensors='pt').input_ids


if __name__ == '__main__':
    te, tok = load(sys.argv[1])

    def enc(s):
        with torch.no_grad():
            return te(ids_of(tok, s)).last_hidden_state[0]

    b = enc(BASE)
    print('hidden norm per token', b.norm(dim=-1).mean().item(), 'max_len', tok.model_max_length)
    for k, v in VARIANTS.items():
        e = enc(v)
        print(f'{k:14s} total diff {(e-b).norm().item():.3f}  max token diff {(e-b).norm(dim=-1).max().item():.3f}')
