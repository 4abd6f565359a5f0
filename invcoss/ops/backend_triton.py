"""The ``triton`` backend: the backend contract of :mod:`invcoss.ops.dispatch` over :mod:`invcoss.kernels`.

Every function here is the thin contract entry of one Triton op family; the kernels, their launchers
and their ``torch.library`` registrations (namespace ``invcoss_triton``, with autograd formulas and,
under the interpreter, fake implementations) live in ``kernels/tv.py``, ``kernels/stats.py`` and
``kernels/repulsive.py``. Accumulation is fp32 for every input dtype (fp64 inputs too), except that
``welford_update`` accumulates in its state's dtype (fp64 by default); gradients come back in the
input's dtype. On CPU tensors the kernels run through ``TRITON_INTERPRET=1`` (slowly, for tests).
"""

from __future__ import annotations

from torch import Tensor

from invcoss.kernels import repulsive as _repulsive
from invcoss.kernels import stats as _stats
from invcoss.kernels import tv as _tv


def tv(x: Tensor, weights: tuple[float, ...]) -> Tensor:
    """Per-sample weighted anisotropic L1 sums of x ``(B, C, *S)``, ``(B,)`` fp32 (Eq. 8)."""
    return _tv.total_variation(x, weights)


def col_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and biased variance of x ``(N, F)`` in fp32, differentiable."""
    return _stats.batch_mean_var(x)


def welford_update(x: Tensor, count: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Fold x ``(N, F)`` into the running state ``(count, mean, m2)`` (Eq. 9); no autograd."""
    return _stats.welford_update(x, count, mean, m2)


def stat_matching(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``||mean_N(x) - mean||_2 + ||var_N(x) - var||_2`` (Eq. 3), 0-dim fp32, differentiable in x."""
    return _stats.stat_matching_loss(x, mean, var)


def repulsive_direct(h: Tensor, pool: Tensor, eps: float) -> Tensor:
    """Eq. 5 of h ``(B, D)`` against pool ``(P, D)`` without the ``B x P`` matrix in memory."""
    return _repulsive.repulsive_direct(h, pool, eps)


def repulsive_gram(h: Tensor, gram: Tensor, count: int, eps: float) -> Tensor:
    """Eq. 5 from the Gram matrix of ``count`` normalised pool rows, O(B D^2)."""
    return _repulsive.repulsive_gram(h, gram, count, eps)


def gram_update(gram: Tensor, feats_hat: Tensor, alpha: float) -> None:
    """In place ``gram += alpha * feats_hat^T feats_hat`` (rank-K update)."""
    _repulsive.gram_update(gram, feats_hat, alpha)
