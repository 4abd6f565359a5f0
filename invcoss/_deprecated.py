"""Old module paths kept for one release: each forwards to its new home with a DeprecationWarning.

0.2.0 moved the flat ``invcoss.inversion_*``, ``invcoss.continual_*``, ``invcoss.experiment`` and
``invcoss.stats`` modules into the ``invcoss.inversion`` and ``invcoss.continual`` packages and
``invcoss.feature_stats`` (docs/architecture.md has the map). The aliases go in 0.3.
"""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Callable


def moved(old: str, *new: str) -> Callable[[str], object]:
    """The ``__getattr__`` of the alias module ``old``: the public names of ``new`` (searched in order).

    No ``__dir__``: tools that walk a module's members (doctest collection) see only the alias
    itself, and no warning fires unless a caller really uses an old path.
    """

    def __getattr__(name: str) -> object:
        for target in new:
            module = importlib.import_module(target)
            if name in _public(module):
                warnings.warn(
                    f"{old} is deprecated and goes in invcoss 0.3: import {name} from {target}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__


def _public(module: types.ModuleType) -> set[str]:
    """What a module offers: its ``__all__``, else its names without a leading underscore."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return set(names)
    return {
        n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
