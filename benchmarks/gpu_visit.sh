#!/usr/bin/env bash
# One GPU visit (device tool): the kasmina tests including `gpu` ones and the Triton kernels on
# CUDA, then the kernel and dormant-overhead benchmarks. Uses the GPU machine's own python3
# (PyTorch, Triton, pytest). Results land in $OUT; copy them to benchmarks/results/.
set -uo pipefail
export PYTHONPATH=services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  | tee -a "$OUT/gpu.txt"
python3 -m pytest services/kasmina-runtime/tests -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -8
python3 benchmarks/bench_layer.py --out "$OUT" 2>&1 | tee "$OUT/bench_layer.log" | tail -45
python3 benchmarks/bench_dormant.py --device cuda --quick --out "$OUT" > "$OUT/bench_dormant.log" 2>&1
grep -E "4096 x 32768 +seeds 1024 " "$OUT/bench_dormant.log"
python3 benchmarks/probe_overhead.py 2>&1 | tee "$OUT/probe_overhead.log"
