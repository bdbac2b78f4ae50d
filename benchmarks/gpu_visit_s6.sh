#!/usr/bin/env bash
# Session 6's GPU visit (device tool), one script: the CUDA-graph tests, then the step matrix's
# bars shapes with the graphed modes beside the eager ones. Results land in $OUT (copied to
# benchmarks/results/ by hand). TAG names the visit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TAG=${TAG:-s6a}; D=$(date +%F)
mkdir -p "$OUT" benchmarks/results
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/gpu_$TAG.txt"
timeout ${PYTEST_S:-150} python3 -m pytest -q -p no:cacheprovider -rs -x ${PYTEST_FILES:-services/kasmina-runtime/tests/test_graphs.py} \
  2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -30
timeout ${BENCH_S:-240} python3 benchmarks/bench_step.py --shapes 1024x8192,4096x32768 --seeds 1024 --dtypes bf16 \
  --modes ${MODES:-bare,bare2,training,graft10,training_g,graft10_g} --tag "_$TAG" --out "$OUT" 2>&1 \
  | tee "$OUT/step_h200_${D}_$TAG.log" | tail -40
ls "$OUT"
