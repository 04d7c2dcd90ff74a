#!/bin/bash
# judge-match and judge-quality on null-text generations of the first 48 TRAINING captions
set -e
P=$1; O=$2; B=/work/main/target/release/reneg; J=/work/mini-v4/judge
rm -rf $O; $B generate --model $P --prompts /work/diag/train48.txt --steps 20 --seed 0 --out $O >/dev/null 2>&1
python3 - $O <<'P'
import sys,os,json
o=sys.argv[1]; caps=[l.rstrip('\n') for l in open('/work/diag/train48.txt')]
fs=sorted(f for f in os.listdir(o) if f.endswith('.png'))
with open(o+'/pairs.jsonl','w') as f:
    for c,p in zip(caps,fs): f.write(json.dumps({"image":p,"prompt":c})+"\n")
P
for k in judge-match judge-quality; do $B score --reward $k --reward-model $J --pairs $O/pairs.jsonl --out $O/$k.json >/dev/null 2>&1; python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); 
v=[x['score'] if isinstance(x,dict) else x for x in (d['scores'] if 'scores' in d else d)]
print(sys.argv[2], round(sum(v)/len(v),2))" $O/$k.json $k || head -c 300 $O/$k.json; done
