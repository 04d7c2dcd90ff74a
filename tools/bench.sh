#!/usr/bin/env bash
# Runs benches/train_step.rs and tools/bench_reference.py side by side, one case per process
# (peak RSS is per process), and prints their JSON lines. For the `full` cases reneg runs twice,
# with the staged and the one-pass gradient step (train::step::Backward). Usage:
#   tools/bench.sh [PYTHON] [CASES...]      (default: /work/pyref/bin/python; tiny full16 full32)
# RENEG_BENCH_REPS sets the repetitions of both sides (the tiny step is noisy: 15 or more).
# Not part of CI: it needs the PyTorch reference venv of tools/gen_parity.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-/work/pyref/bin/python}
shift || true
cases=${*:-tiny full16 full32}
cargo bench --bench train_step --no-run >/dev/null 2>&1
nproc | sed 's/^/# cores: /'
for c in $cases; do
  RENEG_BENCH_PHASES=1 cargo bench --quiet --bench train_step -- "$c" 2>&1 | grep -E "^(\{|phase)"
  if [[ $c == full* || $c == sdxl* || $c == pixart* ]]; then
    RENEG_BENCH_BACKWARD=one-pass cargo bench --quiet --bench train_step -- "$c" 2>&1 | grep -E "^\{"
  fi
  "$py" tools/bench_reference.py "$c" 2>/dev/null | grep '^{'
done
