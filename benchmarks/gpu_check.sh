#!/usr/bin/env bash
# Everything one GPU session should do, in a single call of at most 8 minutes on an H100/H200
# (the step limits below add up to 480 s):
#   1. build the extension for sm_90,
#   2. run the CUDA and Triton tests on the GPU,
#   3. measure the roofs (device-to-device copy, bf16 matmul) and run the benchmark sweep,
#   4. time an inversion step with the fused ops against the reference ops,
# and write every log and table under $OUT (default benchmarks/results/gpu-<date>).
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
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
step build 150 "$PY" -m pip install --no-deps --no-build-isolation -e .
step info 20 "$PY" -c "from invcoss.cli.info import collect_info; import json; print(json.dumps(collect_info(), indent=1))"
step tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_ops.py tests/test_ext_build.py
step bench 140 "$PY" -m pytest -q -p no:cacheprovider benchmarks -o python_files='bench_*.py' \
  --ignore benchmarks/bench_inversion.py \
  --bench-device cuda --bench-rounds 10 --benchmark-json "$OUT/bench.json" --bench-results "$OUT"
step inversion 90 "$PY" benchmarks/inversion_step.py --device cuda --deadline 45 --out "$OUT/inversion.md"
cat "$OUT"/*.md 2>/dev/null
echo "gpu_check: $failed step(s) failed; results in $OUT"
exit "$failed"
