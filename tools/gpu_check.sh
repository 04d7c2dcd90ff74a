#!/usr/bin/env bash
# The GPU checklist (shared/docs/GPU.md) in one run on a lent GPU machine, from what
# tools/gpu_prepare.sh packed into .gpu/ and .whl/ (carried with the call):
#   1. the parity cases on the GPU in f32 (asserted, the usual tolerances), bf16 and f16 (reported);
#   2. reneg's training step with SD1.5's UNet and VAE (random weights) at 512x512, batch 1 and 4;
#   3. the same step in PyTorch / diffusers (tools/bench_reference.py) on the same GPU.
# Usage there: `set -o pipefail; bash tools/gpu_check.sh 2>&1 | tee $OUT/log`. Everything lands in $OUT:
# log (this output), bench.jsonl (one JSON line per bench, with what else was printed),
# gpu-<commit>.jsonl (the bench lines alone: commit it as benches/results/), parity_{f32,bf16,f16}.log.
# Each step has a timeout and the whole run a deadline (DEADLINE seconds, default 390): a step that
# would start past it is skipped, so the log always says what ran. Every step also records the
# peak of `nvidia-smi`'s memory.used (sampled every 20 ms) over its process.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-480}
# The commit measured (the device machine's copy of the tree has no .git): written by
# tools/gpu_prepare.sh beside the binaries it built.
export RENEG_COMMIT=${RENEG_COMMIT:-$(cat .gpu/commit 2>/dev/null || echo unknown)}
start=$(date +%s)
now() { echo $(($(date +%s) - start)); }

step() { # NAME MAX_SECONDS SCRIPT: runs SCRIPT with a timeout, records rc, time and nvidia-smi's peak
  local name=$1 max=$2 script=$3
  local left=$((DEADLINE - $(now)))
  local t=$((left < max ? left : max))
  if ((t < 20)); then
    echo "== SKIPPED $name: ${left}s left of the deadline"
    return
  fi
  echo "== $name (timeout ${t}s, at $(now)s)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"/tmp/smi.$name" 2>/dev/null &
  local smi=$! t0=$(date +%s%N)
  timeout -k 5 "$t" bash -o pipefail -c "$script"
  local rc=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  local peak
  peak=$(sort -n "/tmp/smi.$name" | tail -1)
  echo "== $name: rc=$rc wall=$((($(date +%s%N) - t0) / 1000000))ms nvidia_smi_peak_mib=${peak:-?}"
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
nproc

echo "== unpack (at $(now)s)"
xz -dc .gpu/bin.tar.xz | tar -x -C .gpu || echo "unpack of the binaries FAILED"
rm -rf tests/fixtures/parity
xz -dc .gpu/parity.tar.xz | tar -x || echo "unpack of the parity cases FAILED"
ls tests/fixtures/parity

# The CUDA libraries the binaries were linked against (stubs at build time): from the toolkit
# or PyTorch's wheels, wherever the loader does not already find them.
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  if ! ldconfig -p | grep -q "$lib"; then
    f=$(find /usr/local/cuda/ /usr/local/cuda*/ /opt -name "$lib*" -print -quit 2>/dev/null)
    [ -n "$f" ] && export LD_LIBRARY_PATH=$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
done
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
ldd .gpu/bin/train_step | grep -E 'not found|cuda|cublas|curand|nvrtc'
# The candle kernels are PTX, compiled by the driver at first load: keep them for the next process.
export CUDA_CACHE_PATH=/tmp/nvcache CUDA_CACHE_MAXSIZE=4294967296

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl && export PYTHONPATH=/tmp/site || echo "diffusers install FAILED"
export PYTHONUNBUFFERED=1
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "cudnn", torch.backends.cudnn.version(), "diffusers", diffusers.__version__)'

parity() { # DTYPE
  RENEG_TEST_DEVICE=cuda RENEG_TEST_DTYPE=$1 .gpu/bin/parity --nocapture --test-threads=1 \
    >"$OUT/parity_$1.log" 2>&1
  local rc=$?
  grep -E '^case |FAIL|SKIP|^parity:|^test result|panicked' "$OUT/parity_$1.log" | head -60
  if [ "$1" != f32 ]; then sed -n '/largest max rel err per tensor/,$p' "$OUT/parity_$1.log" | head -40; fi
  return $rc
}
bench() { # ARGS...: the Rust bench on the GPU
  RENEG_BENCH_DEVICE=cuda .gpu/bin/train_step "$@" 2>&1 | tee -a "$OUT/bench.jsonl"
}
ref() { # ARGS...: the PyTorch reference on the GPU
  python3 tools/bench_reference.py --device cuda "$@" 2>&1 | tee -a "$OUT/bench.jsonl"
}
export -f parity bench ref

# Issue 15's matrix: SD1.5 UNet + VAE (random weights) at 512x512, reneg against PyTorch like for
# like at each precision (f32: TF32 off on both sides; tf32: on; bf16: autocast), batch 4 first
# (the gradient step's memory target), then 1, then 16 with checkpointing on both sides.
step parity-f32 90 'parity f32'
for b in 4 1 16; do
  ck=""; rck=""
  if [ $b = 16 ]; then ck="RENEG_BENCH_CHECKPOINTING=1"; rck="--checkpointing"; fi
  for p in f32 tf32 bf16; do
    phases=""; [ $b = 4 ] && [ $p = f32 ] && phases="RENEG_BENCH_PHASES=1"
    step "reneg-b$b-$p" 120 "$phases $ck RENEG_BENCH_PRECISION=$p bench full64x$b"
    step "torch-b$b-$p" 90 "ref full64x$b --precision $p $rck"
  done
done
step parity-bf16 60 'parity bf16'
step parity-f16 60 'parity f16'

echo "== done at $(now)s"
echo "== bench lines"
grep '^{' "$OUT/bench.jsonl" | tee "$OUT/gpu-${RENEG_COMMIT:-unknown}.jsonl"
