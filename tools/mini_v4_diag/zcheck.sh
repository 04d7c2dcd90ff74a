#!/bin/bash
# Pipeline from the zero-SNR joint checkpoint; judge on train48; montage of rep.txt (4 captions x 6 seeds)
set -e
N=$1; P=/work/diag/z$N
/work/pyref/bin/python $(dirname $0)/pilot.py /work/mini-v4z/.joint.partial.safetensors /work/mini-v4z $P
cp /work/diag/zsnr_sched.json $P/scheduler/scheduler_config.json
bash $(dirname $0)/progress.sh $P /work/diag/prog-z$N
rm -rf /work/diag/genz$N; /work/reneg-v4z generate --model $P --prompts /work/diag/rep.txt --steps 20 --seed 0 --out /work/diag/genz$N > /dev/null 2>&1
/work/pyref/bin/python $(dirname $0)/montage.py /work/diag/genz$N 6 /work/diag/mz$N.png
