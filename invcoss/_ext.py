"""The one place that imports the compiled extension ``invcoss._C``.

``C`` is the module or None; ``IMPORT_ERROR`` says why it is missing; ``HAS_CUDA`` tells whether
it was built with CUDA kernels; ``BUILD_INFO`` is what it was built against (``torch``,
``torch_cuda``, ``openmp``, ``cuda_kernels``; setup.py records it in the module and in
``_C_build.json`` beside it; empty when unknown). The package works without the extension, on the
torch and Triton backends.

The extension is compiled against one torch. When the torch that runs differs from it, or a
compiled module is there but does not load, loading warns once (``ExtensionBuildWarning``) with the
fix; this happens the first time the extension is needed (the first op call, ``invcoss-cli info``),
since ``import invcoss`` itself imports no torch. A package installed without the extension on
purpose (``INVCOSS_NO_EXTENSION=1``) does not warn.
``INVCOSS_DISABLE_EXTENSION=1`` leaves a built extension unloaded (the ``cpu`` and ``cuda`` backends
then report that as the reason), to rule it out when chasing a problem.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import warnings
from pathlib import Path

BUILD_INFO_FILE = "_C_build.json"  # setup.py's BUILD_INFO_FILE
REBUILD = (
    "rebuild it against this torch: `pip install --no-build-isolation --no-deps --force-reinstall "
    "--no-binary invcoss invcoss` (a source checkout: `pip install --no-build-isolation -e .`)"
)


class ExtensionBuildWarning(UserWarning):
    """invcoss._C does not fit the torch that runs (built against another one, or does not load)."""


def build_problem(built: dict, torch_version: str, import_error: str = "") -> str:
    """The warning for a module ``built`` against some torch (``{}``: unknown) that runs with
    ``torch_version`` and failed to import with ``import_error`` ("" when it loaded); "" when fine.

    >>> build_problem({"torch": "2.14.1+cu130"}, "2.14.1+cu130")
    ''
    >>> build_problem({"torch": "2.14.1+cu130"}, "2.13.0+cpu").split(":")[0]
    'invcoss._C was built against torch 2.14.1+cu130, but this is torch 2.13.0+cpu'
    """
    other = built.get("torch") not in (None, torch_version)
    if not other and not import_error:
        return ""
    what = [f"was built against torch {built['torch']}, but this is torch {torch_version}"] if other else []
    if import_error:
        what.append(f"does not load ({import_error})")
        consequence = "invcoss runs on its slower torch and Triton backends"
    else:
        consequence = "its kernels may crash or compute wrong results"
    fix = REBUILD + (f", or install torch {built['torch']}" if other else "")
    return f"invcoss._C {' and '.join(what)}: {consequence}. To fix it, {fix}."


def _recorded_build(here: Path) -> dict:
    try:
        return json.loads((here / BUILD_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


C = None
IMPORT_ERROR = ""
HAS_CUDA = False
BUILD_INFO: dict = {}

if os.environ.get("INVCOSS_DISABLE_EXTENSION", "0") == "1":
    IMPORT_ERROR = "disabled by INVCOSS_DISABLE_EXTENSION=1"
else:
    import torch  # loads libtorch before the extension

    _here = Path(__file__).parent
    BUILD_INFO = _recorded_build(_here)
    try:
        from invcoss import _C as C  # type: ignore[attr-defined, no-redef]

        if hasattr(C, "build_info"):  # the record compiled into the module wins over the file
            BUILD_INFO = json.loads(C.build_info())
        HAS_CUDA = bool(C.has_cuda())
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build or another torch
        C = None
        IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    # No compiled module at all is a choice (INVCOSS_NO_EXTENSION=1), not a problem to warn about.
    if any((_here / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        _problem = build_problem(BUILD_INFO, torch.__version__, IMPORT_ERROR)
        if _problem:
            warnings.warn(_problem, ExtensionBuildWarning, stacklevel=1)
