#!/usr/bin/env bash
# One thread against two for the miniature world's experiment (the default of
# `reneg mini experiment --threads`): the same small experiment (20 ReNeg steps, 4 held-out
# prompts x 1 seed, per-sample and the ControlNet transfer included) run alternately with each
# setting, twice, on an otherwise idle machine. Prints each run's wall time and checks that
# the two settings score the same images (the thread count changes sums' order only).
# Since ef63712, --threads 1 also splits the evaluations into one single-threaded process per
# core (--threads 2 on two cores: one process); the committed output (cc91efa) predates that and
# compares one process on one thread against one on two.
# Usage: tools/mini_threads.sh [reneg binary]   (output: benches/results/mini-threads.txt)
set -euo pipefail
bin=${1:-target/release/reneg}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(nproc) cores"
for round in 1 2; do
  for t in 1 2; do
    out="$work/t$t-r$round"
    start=$(date +%s.%N)
    "$bin" mini experiment --out "$out" --train-steps 20 --prompts 4 --seeds 1 \
      --threads "$t" > "$out.log" 2>&1
    end=$(date +%s.%N)
    echo "threads $t round $round: $(python3 -c "print(round($end - $start, 1))") s"
  done
done
for t in 1 2; do
  echo "threads $t: mean score per reward and negative (eval/report.json)"
  python3 -c "
import json,sys
for x in json.load(open(sys.argv[1]))['results']:
    print(f\"  {x['reward']:14s} {x['negative'][-40:]:40s} {x['mean']:.6f}\")" "$work/t$t-r1/eval/report.json"
done
