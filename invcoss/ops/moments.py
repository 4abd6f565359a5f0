"""Running moments ``(count, mean, m2)`` and Chan et al.'s merge of two of them (Eq. 9, Appendix B.2).

Kept apart from the backends: the merge is not an op of the backend contract, but the torch
reference, :class:`~invcoss.ops.RunningStats` and the benchmarks share it.
"""

from __future__ import annotations

import torch  # noqa: F401  (the docstring example uses it)
from torch import Tensor


def chan_merge(
    n_a: int, mean_a: Tensor, m2_a: Tensor, n_b: int, mean_b: Tensor, m2_b: Tensor
) -> tuple[int, Tensor, Tensor]:
    """Merge two running states ``(count, mean, m2)`` with Chan et al.'s parallel formula (Eq. 9).

    ``m2`` is the sum of squared deviations from the mean. The one Python copy of the merge: the
    torch backend's ``welford_update``, :class:`~invcoss.ops.RunningStats` (``merge``,
    ``all_reduce``) and the benchmarks' eager reference all call it (the Triton and C++/CUDA kernels
    have their own, in device code). An empty side returns the other one as it is.

    Example:
        >>> t = torch.tensor
        >>> n, mean, m2 = chan_merge(2, t([1.0]), t([2.0]), 2, t([3.0]), t([2.0]))  # [0, 2] and [2, 4]
        >>> n, mean.item(), m2.item()  # mean 2; squared deviations 4 + 0 + 0 + 4
        (4, 2.0, 8.0)
    """
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)
