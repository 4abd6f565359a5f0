#!/usr/bin/env bash
# The test suite on the GPU machine's software, on this CPU: Python 3.12, torch 2.11.0 (+cu130,
# which brings Triton 3.6.0) and torchvision 0.26.0 in a throwaway venv (about 5 GB, mostly
# downloaded CUDA libraries), the extension built against that torch with nvcc, then `make test`'s
# and `make test-slow`'s selections. Never run by CI: run it before a GPU session when torch,
# Triton or the kernels' launch code changed.
#
#   bash benchmarks/compat_rehearsal.sh [VENV_DIR] [SRC_DIR]
#
# VENV_DIR (default /tmp/invcoss-compat-venv) is reused when it exists. SRC_DIR (default
# /tmp/invcoss-compat-src) receives a clone of this checkout's HEAD, so the extension built there
# never replaces this checkout's. NumPy stays below 2.4: Triton 3.6's interpreter cannot run with a
# newer one (the GPU machine, with NumPy 2.5, compiles the kernels and does not interpret them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/invcoss-compat-venv}
SRC=${2:-/tmp/invcoss-compat-src}
PY312=${PYTHON312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "compat_rehearsal: python3.12 not found (set PYTHON312)" >&2; exit 2; }
CUDA_HOME=${CUDA_HOME:-$(ls -d /usr/local/cuda-13.0 /usr/local/cuda 2>/dev/null | head -n 1)}
export CUDA_HOME TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "setuptools>=77,<82" wheel
  "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0
fi
rm -rf "$SRC"
git clone -q . "$SRC"
(cd "$SRC" && "$VENV/bin/pip" install -q --no-build-isolation -e '.[dev]' && "$VENV/bin/pip" install -q "numpy<2.4")
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
cd "$SRC"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests --doctest-modules invcoss -m "not slow"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests -m slow
