#!/usr/bin/env bash
# One GPU visit (device tool): the kasmina test suite including the `gpu` tests, then the
# dormant-overhead benchmark on CUDA. Uses the GPU machine's own python3 (PyTorch, pytest).
# Results land in $OUT (copied back to benchmarks/results/ by hand).
set -uo pipefail
export PYTHONPATH=services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m pytest services/kasmina-runtime/tests -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -15
python3 benchmarks/bench_dormant.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_dormant.log" \
  | tail -70
