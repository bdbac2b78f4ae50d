#!/usr/bin/env bash
# Session 7's GPU visit (device tool; its last form, s7d), one script: the GPU tests (fused
# node, graphs, the GPU suite), the seed kernels alone (probe_seed_kernels.py), the step matrix's
# bars shapes with the fused node beside the general path (_gp) and the graphed modes, then a
# per-kernel profile of the large growing step. Results land in $OUT (copied to results/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TAG=${TAG:-s7d}; D=$(date +%F)
T=services/kasmina-runtime/tests
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/gpu_$TAG.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_fused.py $T/test_graphs.py $T/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -25
timeout 75 python3 benchmarks/probe_seed_kernels.py 2>&1 | tee "$OUT/probe_seed_kernels_h200_${D}_$TAG.log"
timeout 190 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
  --modes bare,bare2,training,graft10,training_gp,graft10_gp,training_g,graft10_g --tag "_$TAG" --out "$OUT" 2>&1 \
  | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -60
timeout 45 python3 benchmarks/probe_step.py --shape 4096x32768 --modes graft10,training --top 16 > "$OUT/probe_step_h200_${D}_$TAG.log" 2>&1
grep -E "^=|seed|Fused|mm|sum|copy" "$OUT/probe_step_h200_${D}_$TAG.log" | head -30
