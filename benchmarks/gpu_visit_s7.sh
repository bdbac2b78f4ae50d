#!/usr/bin/env bash
# Session 7's GPU visit (device tool), one script: the GPU tests of the fused Linear node
# (kasmina/fused.py) and of the graphs, the step matrix's bars shapes with the fused node beside
# the general path (_gp) and the graphed modes, then a per-kernel profile of the large growing
# step. Results land in $OUT (copied to benchmarks/results/ by hand). TAG names the visit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TAG=${TAG:-s7a}; D=$(date +%F)
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/gpu_$TAG.txt"
T=services/kasmina-runtime/tests
timeout ${PYTEST_S:-200} python3 -m pytest -q -p no:cacheprovider -rs ${PYTEST_FILES:-$T/test_fused.py $T/test_graphs.py $T/test_gpu.py} \
  2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -30
timeout ${BENCH_S:-300} python3 benchmarks/bench_step.py --shapes ${SHAPES:-4096x32768,1024x8192} --seeds 1024 --dtypes bf16 \
  --modes ${MODES:-bare,bare2,dormant,dormant10,training,graft10,training_gp,graft10_gp,training_g,graft10_g} --tag "_$TAG" --out "$OUT" 2>&1 \
  | tee "$OUT/step_h200_${D}_$TAG.log" | tail -45
timeout ${PROBE_S:-90} python3 benchmarks/probe_step.py --shape 4096x32768 --modes ${PROBE_MODES:-graft10,graft10_gp} --top 18 \
  2>&1 > "$OUT/probe_step_h200_${D}_$TAG.log"; tail -50 "$OUT/probe_step_h200_${D}_$TAG.log"
ls "$OUT"
