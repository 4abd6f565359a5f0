# Every target does its own set-up on a fresh machine: `make demo` and `make test` are all a new
# user needs. The venv, torch and the editable install with the extension are built once and
# rebuilt only when pyproject.toml, setup.py or csrc/ change.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip lists every local wheel folder it skips; keep the log readable.
QUIET := 2>&1 | sed '/is ignored: it is neither/d'
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.invcoss-installed
# The CUDA toolkit builds the extension's CUDA kernels (a GPU is not needed to compile them).
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export CUDA_HOME
export MAX_JOBS ?= 2

.PHONY: install demo assets test test-slow bench bench-guard bench-targets gpu-rehearse lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "setuptools>=77" wheel $(QUIET)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 $(QUIET)
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]' $(QUIET)
	touch $(STAMP)

# The main job: invert the packaged CT model into synthetic volumes (out/demo), a few minutes on a CPU.
demo: install
	rm -rf out/demo
	$(BIN)/invcoss-cli invert --modality ct --out out/demo

# Rebuild the packaged default models (invcoss/assets/<modality>/) from phantoms, with fixed seeds.
assets: install
	$(BIN)/python -m invcoss.assets.build

# The suite without the end-to-end runs marked slow (and the package's doctests); test-slow runs
# only those. CI runs both.
test: install
	$(BIN)/python -m pytest -q tests --doctest-modules invcoss -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q tests -m slow

# The extension's ratio table, then the pytest-benchmark suites (eager, torch.compile, every backend);
# tables land in benchmarks/results/<machine>-cpu-<date>.{json,md}. BENCH_FLAGS=--bench-quick drops
# the paper-size cases.
bench: install
	$(BIN)/python benchmarks/cpu_ratios.py
	TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider benchmarks \
		-o python_files='bench_*.py' --bench-device cpu --bench-rounds 3 $(BENCH_FLAGS)

# The rows, thresholds and timing of the guard: invcoss/benchmark/guard.py (cpu_ratios.py runs it).
bench-guard: install
	$(BIN)/python benchmarks/cpu_ratios.py --guard

# The CPU throughput targets (invcoss/benchmark/targets.py): the fused kernels against torch.compile and
# this machine's copy bandwidth, measured in one run; exits 1 when one is missed.
bench-targets: install
	TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python -m invcoss.benchmark.targets --strict $(TARGET_FLAGS)

# The GPU check's every step on this CPU (Triton through the interpreter, tiny sizes), in about two
# minutes; tests/benchmark/test_gpu_check.py runs the same in `make test-slow` (CI runs both).
# On a GPU: bash benchmarks/gpu_check.sh
gpu-rehearse: install
	OUT=out/gpu-rehearsal PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --rehearse

lint: install
	$(BIN)/ruff check invcoss kernels tests benchmarks
	$(BIN)/ruff format --check invcoss kernels tests benchmarks

clean:
	rm -rf build *.egg-info invcoss/_C*.so invcoss/_C_build.json
