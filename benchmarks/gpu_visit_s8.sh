#!/usr/bin/env bash
# Session 8's GPU visits (device tool), one script, PART picks the visit's work:
#   probe: the seed kernels' forms alone (probe_seed_kernels.py), then the bars' two shapes
#          with the node beside the general path and graphs, then a per-kernel profile;
#   tests: the GPU test files (fused node, graphs, kernels, exactness, the GPU suite);
#   matrix: bench_step's whole matrix (every bar's rows).
# Results land in $OUT (copied to benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/services/kasmina-runtime/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TAG=${TAG:-s8a}; D=$(date +%F); PART=${PART:-probe}
T=services/kasmina-runtime/tests
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/gpu_$TAG.txt"
case $PART in
probe)
  timeout 170 python3 benchmarks/probe_seed_kernels.py 2>&1 | tee "$OUT/probe_seed_kernels_h200_${D}_$TAG.log"
  timeout 300 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant,dormant10,training,graft10,training_gp,graft10_gp,training_g,graft10_g \
    --tag "_$TAG" --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -70
  timeout 60 python3 benchmarks/probe_step.py --shape 4096x32768 --modes graft10,training --top 18 > "$OUT/probe_step_h200_${D}_$TAG.log" 2>&1
  grep -E "^=|seed|Fused|mm|sum|mul|elementwise" "$OUT/probe_step_h200_${D}_$TAG.log" | head -40 ;;
tests)
  timeout 540 python3 -m pytest -q -p no:cacheprovider -rs --tb=short -x $T/test_fused.py $T/test_graphs.py \
    $T/test_kernels.py $T/test_exactness.py $T/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -30 ;;
matrix)
  timeout 570 python3 benchmarks/bench_step.py --tag "_$TAG" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "bar|missed|met|fail|so far" | tail -60 ;;
esac
