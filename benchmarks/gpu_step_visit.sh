#!/usr/bin/env bash
# One GPU visit for the whole-training-step benchmark (benchmarks/bench_step.py), in one go:
# the correctness checks on the quick subset first (the visit stops there if a check fails:
# timing a wrong layer is wasted GPU time), then the whole matrix, each case checked again
# before it is timed. Uses the GPU machine's own python3 (PyTorch, Triton) and the kasmina of
# this working tree (PYTHONPATH; `pip install -e` of the service only if that does not import).
# The CSV (written after every case, so a run cut short keeps its rows) and the log go to
# benchmarks/results/ ($RES) and, when $OUT is set (the device tool), are copied there too.
#
#   bash benchmarks/gpu_step_visit.sh [bench_step.py arguments]
#   TAG=_bf16 bash benchmarks/gpu_step_visit.sh --dtypes bf16   # the matrix over two visits
#   DEVICE=cpu bash benchmarks/gpu_step_visit.sh --quick          # a test of the script
#
# BUDGET (default 590 s) bounds the whole script: the matrix run gets what the checks left,
# and on the time limit it stops, keeps its rows and prints the bars of what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RES=${RES:-benchmarks/results}
TAG=${TAG:-}
DEVICE=${DEVICE:-cuda}
mkdir -p "$RES"
export PYTHONPATH=$PWD/services/kasmina-runtime/src${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c 'import kasmina' 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e services/kasmina-runtime || exit 1
fi
GPU=cpu
if [ "$DEVICE" = cuda ]; then
  GPU=$($PY -c 'import torch; n = torch.cuda.get_device_name().lower()
print(n.replace("nvidia", "").strip().replace(" ", "_"))') || exit 1
fi
LOG=$RES/step_${GPU}_$(date +%F)${TAG}.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  $PY -c 'import torch, kasmina; print("torch", torch.__version__, "kasmina", kasmina.__file__)
import importlib.util as u; u.find_spec("triton") and print("triton", __import__("triton").__version__)'
  echo "commit $(git rev-parse --short HEAD 2>/dev/null) ($(git status --short 2>/dev/null \
    | wc -l) paths changed)"
} 2>&1 | tee "$LOG"

echo "== checks (quick subset, no timing)" | tee -a "$LOG"
timeout 150 $PY benchmarks/bench_step.py --device "$DEVICE" --check-only --quick \
  --modes bare,dormant,dormant10,training,graft10,graft100,loop 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "== checks failed (exit $rc): the matrix was not run" | tee -a "$LOG"
else
  LEFT=$(( ${BUDGET:-590} - SECONDS ))
  echo "== the matrix ($LEFT s left)" | tee -a "$LOG"
  timeout "$LEFT" $PY benchmarks/bench_step.py --device "$DEVICE" --out "$RES" --tag "$TAG" "$@" \
    2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== exit $rc after ${SECONDS} s" | tee -a "$LOG"
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOG" "$RES"/step_"${GPU}"_"$(date +%F)"*"${TAG}".csv "$OUT"/ 2>/dev/null
fi
exit "$rc"
