#!/usr/bin/env bash
# Everything one GPU session should do, in a single call of at most 8 minutes on an H100/H200
# (the step limits below add up to 480 s):
#   1. build the extension for sm_90,
#   2. run the CUDA and Triton tests on the GPU,
#   3. measure the roofs (device-to-device copy, bf16 matmul) and run the benchmark sweep,
#   4. time an inversion step with the fused ops against the reference ops,
# and write everything under $OUT (default benchmarks/results/gpu-<date>) in six files: the log of
# every step (gpu_check.log), the op tables (<gpu>-cuda-<date>.json and .md), pytest-benchmark's
# raw JSON (bench.json) and the inversion-step table (inversion.md and .json).
#
# Runs unchanged on a bare machine whose python3 already has torch, triton, pytest and
# pytest-benchmark: it installs the project with --no-deps --no-build-isolation and needs nothing
# else. Usage: bash benchmarks/gpu_check.sh   (exit code: the number of failed steps)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
failed=0
LOG="$OUT/gpu_check.log"
: > "$LOG"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to $LOG
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" > "$OUT/step.tmp" 2>&1
  local rc=$?
  cat "$OUT/step.tmp" >> "$LOG"
  tail -n 25 "$OUT/step.tmp"
  rm -f "$OUT/step.tmp"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
step build 150 "$PY" -m pip install --no-deps --no-build-isolation -e .
step info 20 "$PY" -c "from invcoss.cli.info import collect_info; import json; print(json.dumps(collect_info(), indent=1))"
step tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_ops.py tests/test_ext_build.py
step bench 140 "$PY" -m pytest -q -p no:cacheprovider benchmarks -o python_files='bench_*.py' \
  --ignore benchmarks/bench_inversion.py \
  --bench-device cuda --bench-rounds 10 --bench-deadline 110 --benchmark-json "$OUT/bench.json" --bench-results "$OUT"
step inversion 90 "$PY" benchmarks/inversion_step.py --device cuda --deadline 45 --out "$OUT/inversion.md"
cat "$OUT"/*.md 2>/dev/null
echo "gpu_check: $failed step(s) failed; results in $OUT"
exit "$failed"
