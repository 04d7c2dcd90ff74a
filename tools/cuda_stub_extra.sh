#!/usr/bin/env bash
# Link-time stubs for the cuDNN (and NCCL) libraries that cudarc's dynamic linking asks for, made
# the way shared/tools/make_cuda_stubs.sh makes the CUDA ones: every function of cudarc's
# bindings as a stub returning an error. They let `--features cudnn` link on a machine without
# cuDNN; at run time the real libcudnn.so.9 comes from the device machine (PyTorch's wheels).
#   tools/cuda_stub_extra.sh OUTDIR CUDARC_SRC_DIR
set -euo pipefail
out=$1 src=$2
mkdir -p "$out"
mk() { # lib soname sysdir
  grep -ohE '^pub unsafe fn [A-Za-z0-9_]+' "$src/src/$3/sys/mod.rs" | awk '{print $4}' | sort -u \
    | sed 's/.*/int &(void){return 999;}/' >"$out/$1.c"
  gcc -shared -fPIC -O0 -Wl,-soname,"$2" -o "$out/$1.so" "$out/$1.c" && rm "$out/$1.c"
}
mk libcudnn libcudnn.so.9 cudnn
if [ -d "$src/src/nccl/sys" ]; then mk libnccl libnccl.so.2 nccl; fi
ls -l "$out"
