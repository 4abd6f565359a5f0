"""The ``triton`` backend: the backend contract of :mod:`invcoss.ops.dispatch` over :mod:`invcoss.kernels`.

The contract functions are the entry points of the Triton op families, which carry the contract's
names: ``tv`` from ``kernels/tv.py``; ``batch_mean_var``, ``welford_update`` and ``stat_matching`` from
``kernels/stats.py``; ``repulsive_direct``, ``repulsive_gram`` and ``gram_update`` from
``kernels/repulsive.py``. Those files hold the kernels, their launchers and their ``torch.library``
registrations (namespace ``invcoss_triton``, the same op names, with autograd formulas and, under the
interpreter, fake implementations). Accumulation is fp32 for every input dtype (fp64 inputs too),
except that ``welford_update`` accumulates in its state's dtype (fp64 by default); gradients come
back in the input's dtype. On CPU tensors the kernels run through ``TRITON_INTERPRET=1`` (slowly, for
tests).
"""

from __future__ import annotations

from invcoss.kernels.repulsive import gram_update, repulsive_direct, repulsive_gram
from invcoss.kernels.stats import batch_mean_var, stat_matching, welford_update
from invcoss.kernels.tv import tv

__all__ = [
    "batch_mean_var",
    "gram_update",
    "repulsive_direct",
    "repulsive_gram",
    "stat_matching",
    "tv",
    "welford_update",
]
