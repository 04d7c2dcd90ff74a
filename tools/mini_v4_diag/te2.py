import torch,sys
from transformers import CLIPTextModel, CLIPTokenizer
P=sys.argv[1]
te=CLIPTextModel.from_pretrained(P+'/text_encoder').eval(); tok=CLIPTokenizer.from_pretrained(P+'/tokenizer')
base="a large red circle on the left, on a grey background"
vars_={'pos right':"a large red circle on the right, on a grey background",
 'pos top':"a large red circle at the top, on a grey background",
 'colour blue':"a large blue circle on the left, on a grey background",
 'shape square':"a large red square on the left, on a grey background",
 'bg teal':"a large red circle on the left, on a teal background"}
def enc(s):
    ids=tok(s,padding='max_length',max_length=tok.model_max_length,truncation=True,return_tensors='pt').input_ids
    with torch.no_grad(): o=te(ids,output_hidden_states=True)
    return o.hidden_states
b=enc(base)
for L in range(len(b)):
    ln = [m for n,m in te.named_modules() if n.endswith("final_layer_norm")][0]
    row=[]
    for k,v in vars_.items():
        e=enc(v)[L]; x=b[L]
        if L>0: e,x=ln(e),ln(x)
        row.append(f'{k}:{(e-x).norm().item():6.2f}')
    print(L,' '.join(row))
