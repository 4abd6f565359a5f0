"""The one place that imports the compiled extension ``invcoss._C``.

``C`` is the module or None; ``IMPORT_ERROR`` says why it is missing; ``HAS_CUDA`` tells whether
it was built with CUDA kernels. The package works without it, on the torch and Triton backends.
``INVCOSS_DISABLE_EXTENSION=1`` leaves a built extension unloaded (the ``cpu`` and ``cuda`` backends
then report that as the reason), to rule it out when chasing a problem.
"""

from __future__ import annotations

import os

C = None
IMPORT_ERROR = ""
HAS_CUDA = False

if os.environ.get("INVCOSS_DISABLE_EXTENSION", "0") == "1":
    IMPORT_ERROR = "disabled by INVCOSS_DISABLE_EXTENSION=1"
else:
    try:
        import torch  # noqa: F401  (loads libtorch before the extension)

        from invcoss import _C as C  # type: ignore[attr-defined, no-redef]

        HAS_CUDA = bool(C.has_cuda())
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        C = None
        IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
