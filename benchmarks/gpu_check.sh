#!/usr/bin/env bash
# Everything one GPU session should do, in one call of under 8 minutes on an H100/H200, most valuable
# step first, each under its own time limit and all under one budget (GPU_CHECK_BUDGET, 450 s):
#
#   env        the machine, versions and backends (fails at once when cuda or triton is missing)
#   build      the extension for sm_90 only, in the background while `warm` runs
#   warm       every Triton kernel and autotune config the later steps use, compiled in parallel on
#              all cores (and the torch.compile graphs), so no later step compiles on the clock
#   tests      every CUDA and Triton op against the torch reference (fp32/bf16/fp16, fwd and bwd)
#   roofs      device-to-device copy bandwidth, bf16 matmul rate
#   sweep      the ops in fp32 and bf16 on sizes beyond the L2, CUDA events after an L2 flush
#   compile    the torch.compile rows
#   inversion  the whole inversion step at the paper's profile: eager fp32 (reference and fused ops)
#              and the default compiled bf16 step, samples/h, MFU against the bf16 matmul roof
#   report     report.md from the records (and again, later, here: see below)
#
# Every step appends its results to JSON-lines files in $OUT the moment they exist (meta, tests,
# roofs, bench, inversion .jsonl), so a kill at any moment loses at most the row in flight; with
# gpu_check.log and report.md that is seven files. Render whatever came back with
#   python -m invcoss.benchmark.report DIR [--readme README.md]
#
# --rehearse runs every step's mechanics on this CPU (Triton through the interpreter, tiny sizes,
# the extension's cpu backend in place of cuda); tests/benchmark/test_gpu_check.py runs it in `make test`.
#
# Runs unchanged on a bare machine whose python3 has torch, triton and pytest: it installs the
# project with --no-deps --no-build-isolation and needs nothing else (nibabel is imported lazily,
# only by NIfTI reading and writing, which no step uses). Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
RESERVE=12 # seconds kept for the report, whatever happens before it
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
# The device tests: the op tests marked `device` (tests/ops, on INVCOSS_TEST_DEVICE's tensors); the
# rehearsal keeps to a subset the interpreter runs in seconds (REHEARSAL_TESTS in
# invcoss/benchmark/check.py, which selects the same for the warm step).
if [ "$REHEARSE" = 1 ]; then
  export TRITON_INTERPRET=1 INVCOSS_TEST_DEVICE=cpu
  JOBS=${JOBS:-2}
  FLAGS=(--rehearse)
  REQUIRE=cpu,triton
  SELECT=(-m device -k "contiguous and not fp64 or deterministic or nonfinite or build")
else
  export TRITON_INTERPRET=0 TORCH_CUDA_ARCH_LIST=9.0 INVCOSS_TEST_DEVICE=cuda
  SELECT=(-m device)
  JOBS=${JOBS:-$(nproc)}
  export MAX_JOBS=${MAX_JOBS:-$JOBS}
  FLAGS=()
  REQUIRE=cuda,triton
fi
LOG="$OUT/gpu_check.log"
: > "$LOG"
failed=0
LAST_RC=0
T0=$SECONDS

meta() { # meta NAME RC SECONDS: one line per step in meta.jsonl
  printf '{"step": "exit", "name": "%s", "rc": %d, "seconds": %d}\n' "$1" "$2" "$3" >> "$OUT/meta.jsonl"
}

step() { # step NAME LIMIT COMMAND...: run under min(LIMIT, what the budget has left), log, count
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - RESERVE - (SECONDS - T0)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "== $name: not run, the budget of ${BUDGET}s is spent" | tee -a "$LOG"
    meta "$name" 124 0
    failed=$((failed + 1))
    return
  fi
  local t=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  # Python steps stop starting new rows a few seconds before the kill.
  INVCOSS_STEP_DEADLINE=$((limit > 20 ? limit - 8 : limit - 2)) timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 8
  local rc=${PIPESTATUS[0]}
  LAST_RC=$rc
  echo "== $name: exit $rc after $((SECONDS - t)) s" | tee -a "$LOG"
  meta "$name" "$rc" $((SECONDS - t))
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    echo "gpu_check: FAILED: step $name (exit $rc; see $LOG)" | tee -a "$LOG"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$LOG" 2>&1
CHECK=("$PY" -m invcoss.benchmark.check)

if [ "$REHEARSE" = 1 ]; then
  # The project is installed already; the build step checks the extension loads, as on the GPU.
  step install 30 "$PY" -c "import torch, invcoss._C"
  step env 30 "${CHECK[@]}" env --out "$OUT" "${FLAGS[@]}"
  step warm 150 "${CHECK[@]}" warm --out "$OUT" --jobs "$JOBS" "${FLAGS[@]}"
else
  # The package without its extension first (seconds), so warm can import it; the extension then
  # builds in place in the background (sm_90 only) while the Triton kernels compile.
  step install 60 env INVCOSS_NO_EXTENSION=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
  step env 30 "${CHECK[@]}" env --out "$OUT" --skip-extension "${FLAGS[@]}"
  if [ "$LAST_RC" = 4 ]; then # no CUDA device: nothing else can run
    RESERVE=0 step report 12 "$PY" -m invcoss.benchmark.report "$OUT"
    echo "gpu_check: $failed step(s) failed; stopped: no CUDA device" | tee -a "$LOG"
    exit "$failed"
  fi
  # Its log and exit status wait outside $OUT (only the check's seven files belong there).
  SCRATCH=$(mktemp -d)
  (timeout 170 "$PY" setup.py -q build_ext --inplace > "$SCRATCH/build.log" 2>&1; echo $? > "$SCRATCH/build.rc") &
  BUILD_PID=$!
  step warm 150 "${CHECK[@]}" warm --out "$OUT" --jobs "$JOBS" "${FLAGS[@]}"
  export SCRATCH BUILD_PID
  step build 60 bash -c 'while kill -0 "$BUILD_PID" 2>/dev/null; do sleep 1; done
    cat "$SCRATCH/build.log"; rc=$(cat "$SCRATCH/build.rc" 2>/dev/null || echo 1)
    [ "$rc" = 0 ] || echo "gpu_check: FAILED: the extension did not build (exit $rc)"
    exit "$rc"'
  step env-built 30 "${CHECK[@]}" env --out "$OUT" "${FLAGS[@]}"
fi
step tests 90 "$PY" -m pytest -q -p no:cacheprovider -p invcoss.benchmark.pytest_records \
  --records "$OUT/tests.jsonl" --records-step tests --require-backends "$REQUIRE" --require-tests \
  "${SELECT[@]}" tests/ops
step roofs 25 "${CHECK[@]}" roofs --out "$OUT" "${FLAGS[@]}"
step sweep 90 "${CHECK[@]}" sweep --out "$OUT" "${FLAGS[@]}"
step compile 50 "${CHECK[@]}" compile --out "$OUT" "${FLAGS[@]}"
# The compiled step was compiled into inductor's cache by warm; loading it still traces (seconds).
step inversion 120 "${CHECK[@]}" inversion --out "$OUT" "${FLAGS[@]}"
RESERVE=0 step report 12 "$PY" -m invcoss.benchmark.report "$OUT"
echo "gpu_check: $failed step(s) failed in $((SECONDS - T0)) s; results in $OUT" | tee -a "$LOG"
exit "$failed"
