import torch,sys
from transformers import CLIPTextModel, CLIPTokenizer
P=sys.argv[1]
te=CLIPTextModel.from_pretrained(P+'/text_encoder').eval(); tok=CLIPTokenizer.from_pretrained(P+'/tokenizer')
base="a large red circle on the left, on a grey background"
vars_={'pos right':"a large red circle on the right, on a grey background",
 'pos top':"a large red circle at the top, on a grey background",
 'colour blue':"a large blue circle on the left, on a grey background",
 'shape square':"a large red square on the left, on a grey background",
 'size small':"a small red circle on the left, on a grey background",
 'bg teal':"a large red circle on the left, on a teal background"}
def enc(s):
    ids=tok(s,padding='max_length',max_length=tok.model_max_length,truncation=True,return_tensors='pt').input_ids
    with torch.no_grad(): return te(ids).last_hidden_state[0]
b=enc(base); print('hidden norm per token', b.norm(dim=-1).mean().item(), 'max_len', tok.model_max_length)
for k,v in vars_.items():
    e=enc(v); print(f'{k:14s} total diff {(e-b).norm().item():.3f}  max token diff {(e-b).norm(dim=-1).max().item():.3f}')
