"""The one place that imports the compiled extension ``invcoss._C``.

``C`` is the module or None; ``IMPORT_ERROR`` says why it is missing; ``HAS_CUDA`` tells whether
it was built with CUDA kernels; ``BUILD_INFO`` is what it was built against (``torch``,
``torch_cuda``, ``openmp``, ``cuda_kernels``; setup.py records it in the module and in
``_C_build.json`` beside it; empty when unknown). The package works without the extension, on the
torch and Triton backends.

The extension is compiled against one torch. ``import invcoss`` warns when the installed torch is
another one (:mod:`invcoss._build`, without importing torch). Loading the extension, the first time
it is needed (the first op call, ``invcoss-cli info``), checks again against the torch that runs:
it warns (``ExtensionBuildWarning``) with the fix when they differ and ``import invcoss`` has not
said so already, or when a compiled module is there but does not load. A package installed
without the extension on purpose (``INVCOSS_NO_EXTENSION=1``) does not warn.
``INVCOSS_DISABLE_EXTENSION=1`` leaves a built extension unloaded (the ``cpu`` and ``cuda`` backends
then report that as the reason), to rule it out when chasing a problem.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from invcoss import _build
from invcoss._build import BUILD_INFO_FILE, REBUILD, ExtensionBuildWarning, build_problem  # noqa: F401

C = None
IMPORT_ERROR = ""
HAS_CUDA = False
BUILD_INFO: dict = {}

if os.environ.get("INVCOSS_DISABLE_EXTENSION", "0") == "1":
    IMPORT_ERROR = "disabled by INVCOSS_DISABLE_EXTENSION=1"
else:
    import torch  # loads libtorch before the extension

    _here = Path(__file__).parent
    BUILD_INFO = _build.recorded_build(_here)
    try:
        from invcoss import _C as C  # type: ignore[attr-defined, no-redef]

        if hasattr(C, "build_info"):  # the record compiled into the module wins over the file
            BUILD_INFO = json.loads(C.build_info())
        HAS_CUDA = bool(C.has_cuda())
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build or another torch
        C = None
        IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    # No compiled module at all is a choice (INVCOSS_NO_EXTENSION=1), not a problem to warn about.
    if _build.has_compiled_module(_here):
        _problem = build_problem(BUILD_INFO, torch.__version__, IMPORT_ERROR)
        # `import invcoss` already said that this torch is another one; say it again only with news.
        if _problem and (IMPORT_ERROR or _build.warned_for != torch.__version__):
            warnings.warn(_problem, ExtensionBuildWarning, stacklevel=1)
