#!/usr/bin/env bash
# One GPU visit (device tool): the kasmina tests including `gpu` ones and the Triton kernels on
# CUDA, the blend probe (old kernel against new) with one Nsight Compute profile, then the
# kernel and dormant-overhead benchmarks. Uses the GPU machine's own python3 (PyTorch, Triton,
# pytest). Results land in $OUT; copy them to benchmarks/results/.
set -uo pipefail
export PYTHONPATH=services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs services/kasmina-runtime/tests/test_kernels.py \
  services/kasmina-runtime/tests/test_gpu.py services/kasmina-runtime/tests/test_exactness.py \
  services/kasmina-runtime/tests/test_hot_path.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -8
timeout 120 python3 benchmarks/probe_blend.py 2>&1 | tee "$OUT/probe_blend.log"
timeout 90 ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section Occupancy --section WarpStateStats --section LaunchStats \
  python3 benchmarks/probe_blend.py --ncu > "$OUT/ncu_blend.log" 2>&1
grep -E "_kernel|Spilling Requests  |Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Block Size|Grid Size" \
  "$OUT/ncu_blend.log" | head -40
timeout 200 python3 benchmarks/bench_layer.py --out "$OUT" 2>&1 | tee "$OUT/bench_layer.log" | tail -45
timeout 40 python3 benchmarks/probe_overhead.py 2>&1 | tee "$OUT/probe_overhead.log"
