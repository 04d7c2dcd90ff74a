#!/usr/bin/env bash
# Peak memory of loading a full-size SD1.5 pipeline (random weights, tools/gen_full_sd15.py) stored in
# float32 and in float16, and of generating one 512x512 image from it with one DDIM step: two reneg binaries
# (BEFORE and AFTER a change) and diffusers, side by side in one run. Peak RSS from GNU time (max resident
# set, which counts mapped file pages while they are resident). Never run in CI.
#
#   tools/load_memory.sh BEFORE_BIN AFTER_BIN MODELS_PREFIX PYTHON
#   e.g. tools/load_memory.sh /work/bin-before-lazy target/release/reneg /work/sd15-full- /work/pyref/bin/python
set -euo pipefail
before=$1 after=$2 prefix=$3 py=$4
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "# $(date -u +%FT%TZ) $(nproc) cores; before=$before after=$after"
for dtype in f32 f16; do
  model="$prefix$dtype"
  for mode in load generate; do
    for bin in "$before" "$after"; do
      tag=$([ "$bin" = "$before" ] && echo before || echo after)
      if [ "$mode" = load ]; then
        cmd=("$bin" embedding encode --model "$model" --text "" --out "$tmp/e.safetensors")
      else
        cmd=("$bin" generate --model "$model" --scheduler ddim --steps 1 --prompt "a cat" --out "$tmp/g-$tag")
      fi
      /usr/bin/time -f "{\"impl\": \"reneg-$tag\", \"mode\": \"$mode\", \"stored\": \"$dtype\", \"peak_rss_mb\": %M, \"wall_s\": %e}" \
        "${cmd[@]}" > /dev/null 2> "$tmp/err" || { cat "$tmp/err"; exit 1; }
      tail -1 "$tmp/err" | sed 's/"peak_rss_mb": \([0-9]*\)/"peak_rss_kb": \1/'
    done
    "$py" "$here/load_memory_reference.py" "$model" "$mode" | sed "s/}$/, \"stored\": \"$dtype\"}/"
  done
done
