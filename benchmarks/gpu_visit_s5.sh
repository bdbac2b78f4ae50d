#!/usr/bin/env bash
# Session 5's GPU visits (device tool), one script: the kernel tests touched since the last
# visit on CUDA, the legacy-vs-chunked paths on main (bench_paths), the step matrix's bars
# shapes with the noise-floor mode (bare2), and a host-time profile of the small growing step.
# Results land in $OUT (copied to benchmarks/results/ by hand). TAG names the visit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TAG=${TAG:-s5a}; D=$(date +%F)
mkdir -p "$OUT" benchmarks/results
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  echo "commit $(git rev-parse --short HEAD 2>/dev/null) + $(git status --short 2>/dev/null | wc -l) changed"
} 2>&1 | tee "$OUT/gpu_$TAG.txt"
timeout ${PYTEST_S:-150} python3 -m pytest -q -p no:cacheprovider -rs ${PYTEST_FILES:-services/kasmina-runtime/tests/test_kernels.py \
  -k "telemetry or column_stats or layer_selects or fused"} 2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -4
timeout 120 python3 benchmarks/bench_paths.py --device cuda --steps 50 --epochs 2 2>&1 \
  | tee "$OUT/paths_cuda_h200_${D}_$TAG.log" | tail -18
cp benchmarks/results/paths_cuda_h200_${D}.csv "$OUT/paths_cuda_h200_${D}_$TAG.csv" 2>/dev/null
timeout 200 python3 benchmarks/bench_step.py --shapes 1024x8192,4096x32768 --seeds 1024 --dtypes bf16 \
  --modes bare,bare2,dormant,dormant10,training,graft10 --tag "_$TAG" --out "$OUT" 2>&1 \
  | tee "$OUT/step_h200_${D}_$TAG.log" | tail -30
timeout 60 python3 benchmarks/probe_step.py --shape 1024x8192 --modes dormant,graft10 \
  --sort self_cpu_time_total --top 40 2>&1 | tee "$OUT/probe_step_h200_${D}_$TAG.log" | tail -5
ls "$OUT"
