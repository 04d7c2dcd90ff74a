#!/usr/bin/env bash
# Runs benches/train_step.rs and tools/bench_reference.py side by side, one case per process
# (peak RSS is per process), and prints their JSON lines. Usage:
#   tools/bench.sh [PYTHON] [CASES...]      (default: /work/pyref/bin/python; tiny full16 full32)
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
  "$py" tools/bench_reference.py "$c" 2>/dev/null | grep '^{'
done
