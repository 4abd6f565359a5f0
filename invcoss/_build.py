"""What ``invcoss._C`` was built against, and the check ``import invcoss`` makes without torch.

The extension is compiled against one torch and records it (``_C_build.json`` beside the module,
written by setup.py, and ``invcoss._C.build_info()``). ``import invcoss`` compares that record with
the version of the installed torch, read from ``torch/version.py`` without importing torch (well
under a millisecond), and warns once (:class:`ExtensionBuildWarning`) when they differ, with the
fix. :mod:`invcoss._ext` makes the full check when the extension is first loaded (a module that
does not load at all) and does not repeat a warning given here. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import warnings
from pathlib import Path

__all__ = [
    "BUILD_INFO_FILE",
    "REBUILD",
    "ExtensionBuildWarning",
    "build_problem",
    "check_installed_torch",
    "has_compiled_module",
    "installed_torch_version",
    "recorded_build",
]

BUILD_INFO_FILE = "_C_build.json"  # setup.py's BUILD_INFO_FILE
REBUILD = (
    "rebuild it against this torch: `pip install --no-build-isolation --no-deps --force-reinstall "
    "--no-binary invcoss invcoss` (a source checkout: `pip install --no-build-isolation -e .`)"
)
HERE = Path(__file__).parent
# The torch version the import-time check warned about ("" when it did not): _ext does not repeat it.
warned_for = ""


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


def recorded_build(here: Path = HERE) -> dict:
    """The record setup.py wrote beside the module (``{}`` when there is none or it does not parse)."""
    try:
        return json.loads((here / BUILD_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def installed_torch_version() -> str:
    """``torch.__version__`` of the installed torch, read from its ``version.py`` without importing
    it; "" when torch is not found or the file does not say."""
    try:
        spec = importlib.util.find_spec("torch")
        text = Path(spec.origin).with_name("version.py").read_text()  # type: ignore[union-attr, arg-type]
    except (ImportError, ValueError, AttributeError, TypeError, OSError):
        return ""
    found = re.search(r"""^__version__\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return found.group(1) if found else ""


def has_compiled_module(here: Path = HERE) -> bool:
    """Whether a compiled ``_C`` module lies beside ``here`` (none: the package was built without
    the extension on purpose, ``INVCOSS_NO_EXTENSION=1``, or not built yet)."""
    return any((here / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def check_installed_torch(here: Path = HERE) -> str:
    """Warn once when the compiled module beside ``here`` was built against another torch than the
    installed one; returns the warning ("" when there is nothing to say or nothing to compare)."""
    global warned_for
    if not has_compiled_module(here):
        return ""
    built, version = recorded_build(here), installed_torch_version()
    if not version or not built.get("torch"):
        return ""
    problem = build_problem(built, version)
    if problem and not warned_for:
        warned_for = version
        warnings.warn(problem, ExtensionBuildWarning, stacklevel=3)
    return problem
