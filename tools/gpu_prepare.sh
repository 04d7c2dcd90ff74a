#!/usr/bin/env bash
# Builds the CUDA binaries for tools/gpu_check.sh and packs what the GPU machine needs into .gpu/
# and .whl/ (both git-ignored through .git/info/exclude; see BENCHMARKS.md, "GPU"). Not part of CI.
#
#   tools/gpu_prepare.sh [SRC]
#
# SRC is the source tree to build (default: this checkout; a snapshot such as `git archive HEAD`
# unpacked elsewhere keeps a build clear of half-done edits). Environment (defaults in brackets):
#   TK [/work/cudatk]               toolkit folder: venv with the CUDA 13.0 nvcc wheels + link stubs
#   TARGET_DIR [/work/cuda-target]  cargo target dir of the CUDA build
#   CUDA_COMPUTE_CAP [90]           H100 / H200
#   FEATURES [cudnn]                cargo features (cudnn implies cuda; cuda alone without cuDNN)
# The toolkit (once; shared/tools/make_cuda_stubs.sh makes the link-only stubs):
#   python3 -m venv $TK/venv
#   $TK/venv/bin/pip install nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
#       nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
#   shared/tools/make_cuda_stubs.sh $TK/stub/lib ~/.cargo/registry/src/*/cudarc-0.19.10 \
#       $TK/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcudart.so.13
#   tools/cuda_stub_extra.sh $TK/stub/lib ~/.cargo/registry/src/*/cudarc-0.19.10   # libcudnn stub
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
src=${1:-$repo}
TK=${TK:-/work/cudatk}
TARGET_DIR=${TARGET_DIR:-/work/cuda-target}
T=$(echo "$TK"/venv/lib/python3*/site-packages/nvidia/cu13)
mkdir -p "$repo/.gpu"
(
  cd "$src"
  PATH=$T/bin:$PATH CUDA_HOME=$TK/stub CUDA_PATH=$TK/stub CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} \
    nice -n 10 cargo build --release --features "${FEATURES:-cudnn}" --target-dir "$TARGET_DIR" \
    --bench train_step --test parity
  git -C "$repo" rev-parse --short HEAD >"$repo/.gpu/commit.new" 2>/dev/null \
    || echo unknown >"$repo/.gpu/commit.new"
)
newest() { ls -t "$TARGET_DIR"/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
cd "$repo"
mkdir -p .gpu/bin
mv .gpu/commit.new .gpu/commit
cp "$(newest train_step)" .gpu/bin/train_step
cp "$(newest parity)" .gpu/bin/parity
strip .gpu/bin/train_step .gpu/bin/parity
tar -C .gpu -cf - bin | xz -T2 -9 >.gpu/bin.tar.xz
rm -r .gpu/bin
# The parity cases without what they do not need (single-file checkpoints, .pt twins of the
# safetensors), so that the tree that travels stays under the 64 MiB limit.
git ls-files tests/fixtures/parity | grep -v -E 'single_file\.safetensors$|\.pt$' \
  | tar -cf - -T - | xz -T2 -9 >.gpu/parity.tar.xz
# diffusers for tools/bench_reference.py (the GPU image has torch, transformers and the rest).
mkdir -p .whl
for w in diffusers==0.42.1 importlib_metadata==8.7.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp -d .whl "$w"
done
du -sh .gpu/* .whl
