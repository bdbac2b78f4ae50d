#!/usr/bin/env bash
# The GPU visits of the step work (device tool, issue #12), one script, PART picks the visit's work:
#   probe: where the host CPU time of an eager growing step goes at 1024 x 8192 (cProfile),
#          and the dormant step's kernels at 4096 x 32768;
#   kernels: the seed kernels' and the telemetry pass's forms alone, then the bars' shapes;
#   final1 / final2: the GPU tests and the bars' rows / the compile, fp32 and seed-count rows;
#   first: the launch's host time by route, the eager growing step's host time (cProfile),
#          where the large growing step's forward goes, the small shape's rows;
#   launch: the host time of one Triton launch by route (probe_launch.py);
#   split: the launch by route, the host's time of each part of a step (probe_step --split);
#   mid: the GPU tests of the launcher; eager against graphed steps between the bars' shapes;
#   auto: cuda_graphs="auto"'s tests and rows, the launch without Triton's empty hook chains;
#   large: the 4096 x 32768 rows again, 15 rounds;
#   tests: the GPU test files;  rows: the bars' shapes, every mode, bf16 and fp32;
#   matrix: bench_step's whole matrix;
#   s13a: test_kernels' tests after the launcher's (never GPU-run since s9; the first is the fused
#         MLP's, first in a fresh process: the cuBLAS-notice filter), then probe_compile.py;
#   s13b: the small shape's dormant rows, 15 rounds, bf16 and fp32; the large rows (the
#         profiler's warm-up); where a dormant tracking step's host time goes (cProfile); the
#         rest of test_kernels;
#   s13c: test_kernels' first 70 tests; the host time of each part of a dormant step at
#         1024 x 8192 (probe_step --split); the 32- and 64-feature GEMM path (64 seeds);
#   s13e: the blueprints' matmul with its split weight gradient (blueprints._RowsMatmul): the
#         GPU tests of the GEMM path, then the 64-seed rows and their profile again;
#   s13f: s13e's tests and the 64-seed rows, graphed and eager;
#   s13h: the in-place blend for wider banks (fused.forward_in_place): the GPU tests, the
#         64-seed rows and profile;
#   s14c: the dormant tracking step in one launch (triton_telemetry.observe): its GPU tests, the
#         host time of its parts (probe_tracking.py), the dormant rows at both shapes;
#   s14e: test_gpu.py (an attention model wrapped, on the fast paths against the reference),
#         a GPT-style model's training step (bench_model.py) at three sizes;
#   s14f: the model's growing step graphed and eager, and its kernels (profile);
#   s14g: 9-64-feature residual_mlp chunks as tiles (triton_mlp_wide): tests, probe_mlp, the
#         model's and the 64-seed layers' steps;
#   autotune: the first call's cost at row counts new to the process (probe_autotune.py).
# Results land in $OUT (copied to benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/services/kasmina-runtime/src:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TAG=${TAG:-s10a}; D=$(date +%F); PART=${PART:-probe}
T=services/kasmina-runtime/tests
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/gpu_$TAG.txt"
case $PART in
probe)
  timeout 200 python3 benchmarks/probe_step.py --shape 1024x8192 --modes bare,dormant10,training,graft10 \
    --cprofile 300 --top 32 > "$OUT/probe_cpu_h200_${D}_$TAG.log" 2>&1
  grep -E "^====|function calls" "$OUT/probe_cpu_h200_${D}_$TAG.log"
  timeout 120 python3 benchmarks/probe_step.py --shape 1024x8192 --modes training,graft10 --top 30 \
    --sort self_cpu_time_total > "$OUT/probe_step_small_h200_${D}_$TAG.log" 2>&1
  timeout 90 python3 benchmarks/probe_step.py --shape 4096x32768 --modes bare,dormant --top 14 \
    > "$OUT/probe_step_h200_${D}_$TAG.log" 2>&1
  grep -E "^=|kernel|mm|sum" "$OUT/probe_step_h200_${D}_$TAG.log" | head -40 ;;
kernels)
  timeout 200 python3 benchmarks/probe_seed_kernels.py 2>&1 | tee "$OUT/probe_seed_kernels_h200_${D}_$TAG.log"
  timeout 150 python3 benchmarks/probe_column_stats.py 2>&1 | tee "$OUT/probe_column_stats_h200_${D}_$TAG.log"
  timeout 200 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant,dormant10,training,graft10 --rounds 7 \
    --tag "_$TAG" --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -40 ;;
final1)  # the GPU tests, then the bars' shapes (1,024 seeds, bf16, every mode but compile)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_fused.py $T/test_graphs.py \
    $T/test_gpu.py $T/test_exactness.py "$T/test_kernels.py::test_the_launcher_reuses_a_kernel_only_for_its_own_specialisation" \
    2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -8
  timeout 330 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,bare_g,dormant,dormant10,training,graft10,training_g,graft10_g,training_gp,graft10_gp,graft100,loop \
    --tag "_$TAG" --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -70 ;;
final2)  # compile rows; fp32; 64 and 4,096 seeds
  timeout 220 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
    --modes bare,graft10,compile,compile_ro --rounds 7 --tag "_${TAG}compile" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}compile.log" | grep -E "x[0-9]|fail" | head -20
  timeout 150 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes fp32 \
    --modes bare,bare2,dormant10,training,graft10,loop --rounds 7 --tag "_${TAG}fp32" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}fp32.log" | grep -E "x[0-9]|fail" | head -20
  timeout 170 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 64,4096 --dtypes bf16 \
    --modes bare,bare2,dormant10,training,graft10,loop --rounds 5 --tag "_${TAG}seeds" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -30 ;;
launch)  # host time a Triton launch costs, by route (for the next session)
  timeout 120 python3 benchmarks/probe_launch.py 2>&1 | tee "$OUT/probe_launch_h200_${D}_$TAG.log" ;;
first)
  timeout 100 python3 benchmarks/probe_launch.py 2>&1 | tee "$OUT/probe_launch_h200_${D}_$TAG.log"
  timeout 150 python3 benchmarks/probe_step.py --shape 1024x8192 --modes bare,training,graft10 \
    --cprofile 300 --top 32 > "$OUT/probe_cpu_h200_${D}_$TAG.log" 2>&1
  grep -E "^====|function calls" "$OUT/probe_cpu_h200_${D}_$TAG.log"
  timeout 100 python3 benchmarks/probe_step.py --shape 4096x32768 --modes bare,training,graft10 --top 16 \
    > "$OUT/probe_step_h200_${D}_$TAG.log" 2>&1
  grep -E "^=|kernel|mm|sum" "$OUT/probe_step_h200_${D}_$TAG.log" | head -60
  timeout 140 python3 benchmarks/bench_step.py --shapes 1024x8192,4096x32768 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant10,training,graft10 --rounds 7 --tag "_$TAG" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -40 ;;
split)  # the launch's host time by route after the launcher's trim; each part of a step on the host
  timeout 100 python3 benchmarks/probe_launch.py 2>&1 | tee "$OUT/probe_launch_h200_${D}_$TAG.log"
  for shape in 1024x8192 4096x32768; do
    timeout 100 python3 benchmarks/probe_step.py --shape $shape --modes bare,dormant10,training,graft10,training_g \
      --split 300 2>&1 | grep split; done | tee "$OUT/probe_split_h200_${D}_$TAG.log"
  timeout 100 python3 benchmarks/probe_step.py --shape 1024x8192 --modes training,graft10 --top 40 \
    --sort self_cpu_time_total > "$OUT/probe_step_small_h200_${D}_$TAG.log" 2>&1 ;;
mid)  # the GPU tests the launcher touches; eager against graphed growing steps between the bars' shapes
  timeout 230 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_fused.py $T/test_graphs.py \
    "$T/test_kernels.py::test_the_launcher_reuses_a_kernel_only_for_its_own_specialisation" \
    2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -6
  timeout 300 python3 benchmarks/bench_step.py --shapes 2048x8192,2048x16384,4096x8192,4096x16384 \
    --seeds 1024 --dtypes bf16 --modes bare,training,graft10,training_g,graft10_g --rounds 5 \
    --tag "_$TAG" --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|fail" | head -40
  timeout 60 python3 benchmarks/bench_step.py --shapes 2048x16384 --seeds 1024 --dtypes fp32 \
    --modes bare,graft10,graft10_g --rounds 5 --tag "_${TAG}fp32" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}fp32.log" | grep -E "x[0-9]|fail" | head -10 ;;
auto)  # cuda_graphs="auto" (the default): its tests, the launch without Triton's empty hook chains, the bars' shapes
  timeout 60 python3 benchmarks/probe_launch.py 2>&1 | tee "$OUT/probe_launch_h200_${D}_$TAG.log"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_graphs.py $T/test_fused.py \
    "$T/test_kernels.py::test_the_launcher_reuses_a_kernel_only_for_its_own_specialisation" \
    2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -6
  timeout 260 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant10,training,graft10,training_e,graft10_e,training_g,graft10_g --rounds 7 \
    --tag "_$TAG" --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -60
  timeout 90 python3 benchmarks/bench_step.py --shapes 1024x8192 --seeds 64 --dtypes bf16 \
    --modes bare,graft10,graft10_e --rounds 5 --tag "_${TAG}seeds" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -10 ;;
large)  # the 4096 x 32768 rows again, 15 rounds: the run-to-run spread of the growing bar
  timeout 280 python3 benchmarks/bench_step.py --shapes 4096x32768 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant,dormant10,training,graft10 --rounds 15 --tag "_$TAG" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -30 ;;
rows)  # final1's and final2's bench rows without their tests: the bars' shapes, every mode; fp32
  timeout 330 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,bare_g,dormant,dormant10,training,graft10,training_e,graft10_e,training_g,graft10_g,graft100,loop \
    --tag "_$TAG" --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|bar|missed|met|fail" | head -70
  timeout 200 python3 benchmarks/bench_step.py --shapes 4096x32768,1024x8192 --seeds 1024 --dtypes fp32 \
    --modes bare,bare2,dormant10,training,graft10,loop --rounds 7 --tag "_${TAG}fp32" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}fp32.log" | grep -E "x[0-9]|fail" | head -20 ;;
tests)
  timeout 540 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_fused.py $T/test_graphs.py \
    $T/test_telemetry.py $T/test_gpu.py $T/test_exactness.py $T/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -30 ;;
s13a)
  python3 -m pytest --collect-only -q -p no:cacheprovider $T/test_kernels.py 2>/dev/null \
    | grep "::" | sed -n '71,$p' > /tmp/tail_ids
  mapfile -t ids < /tmp/tail_ids  # (parametrised ids hold spaces)
  timeout 260 python3 -m pytest -q -p no:cacheprovider -rs --tb=short "${ids[@]}" 2>&1 \
    | tee "$OUT/pytest_gpu_h200_${D}_${TAG}_kernels_tail.log" | tail -12
  timeout 300 python3 benchmarks/probe_compile.py --shape 4096x32768 --rounds 7 2>&1 \
    | grep -v USDT | tee "$OUT/probe_compile_h200_${D}_$TAG.log" | grep -E "^\[|bmm|seed|mm|Name" | head -60 ;;
s13b)
  timeout 150 python3 benchmarks/bench_step.py --shapes 1024x8192 --seeds 1024 --dtypes bf16,fp32 \
    --modes bare,bare2,dormant,dormant10 --rounds 15 --tag "_$TAG" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|fail" | head -20
  timeout 120 python3 benchmarks/bench_step.py --shapes 4096x32768 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant,dormant10,training,graft10 --rounds 7 --tag "_${TAG}large" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}large.log" | grep -E "x[0-9]|fail" | head -20
  timeout 80 python3 benchmarks/probe_step.py --shape 1024x8192 --modes bare,dormant,dormant10 \
    --cprofile 300 --top 30 > "$OUT/probe_cpu_h200_${D}_$TAG.log" 2>&1
  grep -E "^====|function calls" "$OUT/probe_cpu_h200_${D}_$TAG.log"
  python3 -m pytest --collect-only -q -p no:cacheprovider $T/test_kernels.py 2>/dev/null \
    | grep "::" | sed -n '1,70p' > /tmp/head_ids
  mapfile -t ids < /tmp/head_ids
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --tb=short "${ids[@]}" 2>&1 \
    | tee "$OUT/pytest_gpu_h200_${D}_${TAG}_kernels_head.log" | tail -12 ;;
s13c)
  python3 -m pytest --collect-only -q -p no:cacheprovider $T/test_kernels.py 2>/dev/null \
    | grep "::" | sed -n '1,70p' > /tmp/head_ids
  mapfile -t ids < /tmp/head_ids
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --tb=short "${ids[@]}" 2>&1 \
    | tee "$OUT/pytest_gpu_h200_${D}_${TAG}_kernels_head.log" | tail -12
  timeout 100 python3 benchmarks/probe_step.py --shape 1024x8192 --modes bare,dormant,dormant10 \
    --split 300 2>&1 | grep split | tee "$OUT/probe_split_h200_${D}_$TAG.log"
  timeout 150 python3 benchmarks/bench_step.py --shapes 4096x32768,2048x32768 --seeds 64 --dtypes bf16 \
    --modes bare,bare2,dormant10,training,graft10,loop --rounds 5 --tag "_${TAG}seeds" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -20 ;;
s13e|s13f)
  timeout 260 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_gpu.py $T/test_graphs.py \
    $T/test_exactness.py "$T/test_kernels.py::test_torch_compile_traces_the_layer_without_graph_breaks" \
    2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -12
  timeout 200 python3 benchmarks/bench_step.py --shapes 4096x32768,2048x32768 --seeds 64 --dtypes bf16 \
    --modes bare,bare2,training,graft10,training_e,graft10_e,loop --rounds 5 --tag "_${TAG}seeds" \
    --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -20
  timeout 100 python3 benchmarks/probe_step.py --shape 2048x32768 --seeds 64 --modes graft10 --top 16 \
    2>&1 | grep -v USDT > "$OUT/probe_step_h200_${D}_$TAG.log"
  grep -E "xmma|gemm|Self CUDA time" "$OUT/probe_step_h200_${D}_$TAG.log" | cut -c1-60,130-230 ;;
s13h)
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_gpu.py $T/test_graphs.py \
    $T/test_fused.py $T/test_exactness.py \
    "$T/test_kernels.py::test_torch_compile_traces_the_layer_without_graph_breaks" \
    2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -12
  timeout 150 python3 benchmarks/bench_step.py --shapes 4096x32768,2048x32768 --seeds 64 --dtypes bf16 \
    --modes bare,bare2,training,graft10,training_gp,graft10_gp --rounds 5 --tag "_${TAG}seeds" \
    --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -20
  timeout 80 python3 benchmarks/probe_step.py --shape 2048x32768 --seeds 64 --modes graft10 --top 16 \
    2>&1 | grep -v USDT > "$OUT/probe_step_h200_${D}_$TAG.log"
  grep -E "Name|Self CUDA time" -A 12 "$OUT/probe_step_h200_${D}_$TAG.log" | cut -c1-60,130-230 | head -20 ;;
s14c)  # the dormant tracking step in one launch: its GPU tests, host time, the dormant rows
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_telemetry.py \
    $T/test_gpu.py $T/test_exactness.py "$T/test_kernels.py" -k "observe or telemetry or column_stats \
    or gpu or exact or dormant" 2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -6
  timeout 100 python3 benchmarks/probe_tracking.py --rounds 5 2>&1 | tee "$OUT/probe_tracking_h200_${D}_$TAG.log"
  timeout 150 python3 benchmarks/bench_step.py --shapes 1024x8192 --seeds 1024 --dtypes bf16,fp32 \
    --modes bare,bare2,dormant,dormant10 --rounds 15 --tag "_$TAG" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "x[0-9]|fail" | head -20
  timeout 100 python3 benchmarks/bench_step.py --shapes 1024x8192 --seeds 64,4096 --dtypes bf16 \
    --modes bare,bare2,dormant,dormant10 --rounds 15 --tag "_${TAG}seeds" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -20
  timeout 150 python3 benchmarks/bench_step.py --shapes 4096x32768 --seeds 1024 --dtypes bf16 \
    --modes bare,bare2,dormant,dormant10,training,graft10 --rounds 7 --tag "_${TAG}large" --out "$OUT" 2>&1 \
    | tee "$OUT/step_h200_${D}_${TAG}large.log" | grep -E "x[0-9]|fail" | head -20 ;;
s14e)  # a whole model: the GPU tests (an attention model wrapped), bench_model.py at three sizes
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_gpu.py \
    2>&1 | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -6
  for cfg in "--d 1024 --layers 4 --seq 512 --batch 8 --seeds 256" \
             "--d 512 --layers 4 --seq 256 --batch 8 --seeds 128" \
             "--d 2048 --layers 2 --seq 1024 --batch 8 --seeds 512"; do
    timeout 150 python3 benchmarks/bench_model.py $cfg --tag "_${TAG}_d$(echo $cfg | cut -d' ' -f2)" \
      --out "$OUT" 2>&1 | tee -a "$OUT/model_h200_${D}_$TAG.log" | grep -vi warn
  done ;;
s14f)  # the model's growing step: graphed against eager, and where its GPU time goes
  timeout 170 python3 benchmarks/bench_model.py --d 1024 --layers 4 --seq 512 --batch 8 --seeds 256 \
    --modes bare,bare2,training,graft10,training_e,graft10_e --profile graft10 --tag "_${TAG}_d1024" \
    --out "$OUT" > "$OUT/model_h200_${D}_${TAG}_d1024.log" 2>&1
  grep -E "ms  x|Name|^---" -A0 "$OUT/model_h200_${D}_${TAG}_d1024.log" | head -12
  grep -E "Self CUDA time" -B30 "$OUT/model_h200_${D}_${TAG}_d1024.log" | cut -c1-72,150-200 | tail -31
  timeout 170 python3 benchmarks/bench_model.py --d 2048 --layers 2 --seq 1024 --batch 8 --seeds 512 \
    --modes bare,bare2,graft10,graft10_e --profile graft10_e --tag "_${TAG}_d2048" \
    --out "$OUT" > "$OUT/model_h200_${D}_${TAG}_d2048.log" 2>&1
  grep -E "ms  x" "$OUT/model_h200_${D}_${TAG}_d2048.log"
  grep -E "Self CUDA time" -B30 "$OUT/model_h200_${D}_${TAG}_d2048.log" | cut -c1-72,150-200 | tail -31 ;;
s14g)  # the residual_mlp of 9-64-feature chunks as tiles (triton_mlp_wide): tests, kernels, steps
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --tb=short $T/test_gpu.py \
    "$T/test_kernels.py" -k "mlp or gpu or wide or attention" 2>&1 \
    | tee "$OUT/pytest_gpu_h200_${D}_$TAG.log" | tail -6
  timeout 120 python3 benchmarks/probe_mlp.py 2>&1 | tee "$OUT/probe_mlp_h200_${D}_$TAG.log"
  timeout 130 python3 benchmarks/bench_model.py --d 2048 --layers 2 --seq 1024 --batch 8 --seeds 512 \
    --modes bare,bare2,graft10,graft10_e,training --tag "_${TAG}_d2048" --out "$OUT" 2>&1 \
    | tee "$OUT/model_h200_${D}_${TAG}_d2048.log" | grep -E "ms  x"
  timeout 130 python3 benchmarks/bench_model.py --d 1024 --layers 4 --seq 512 --batch 8 --seeds 256 \
    --modes bare,bare2,graft10,graft10_e,training --tag "_${TAG}_d1024" --out "$OUT" 2>&1 \
    | tee "$OUT/model_h200_${D}_${TAG}_d1024.log" | grep -E "ms  x"
  timeout 150 python3 benchmarks/bench_step.py --shapes 4096x32768,2048x32768 --seeds 64 --dtypes bf16 \
    --modes bare,bare2,training,graft10,training_e,graft10_e --rounds 5 --tag "_${TAG}seeds" \
    --out "$OUT" 2>&1 | tee "$OUT/step_h200_${D}_${TAG}seeds.log" | grep -E "x[0-9]|fail" | head -20 ;;
autotune)  # what a new row count costs on its first call (the autotuners' keys), for the next visit
  timeout 300 python3 benchmarks/probe_autotune.py 2>&1 | tee "$OUT/probe_autotune_h200_${D}_$TAG.log" ;;
matrix)
  timeout 570 python3 benchmarks/bench_step.py --tag "_$TAG" --out "$OUT" ${ARGS:-} 2>&1 \
    | tee "$OUT/step_h200_${D}_$TAG.log" | grep -E "bar|missed|met|fail|so far" | tail -60 ;;
esac
