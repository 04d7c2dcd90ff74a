# te.py's distances after every layer (each through the final layer norm; layer 0 = the embeddings).
# Usage: te2.py PIPELINE_DIR
import torch, sys
from te import BASE, VARIANTS, load, ids_of

te, tok = load(sys.argv[1])
variants = {k: v for k, v in VARIANTS.items() if k != 'size small'}


def enc(s):
    with torch.no_grad():
        return te(ids_of(tok, s), output_hidden_states=True).hidden_states


b = enc(BASE)
for L in range(len(b)):
    ln = [m for n, m in te.named_modules() if n.endswith("final_layer_norm")][0]
    row = []
    for k, v in variants.items():
        e = enc(v)[L]; x = b[L]
        if L > 0: e, x = ln(e), ln(x)
        row.append(f'{k}:{(e-x).norm().item():6.2f}')
    print(L, ' '.join(row))
