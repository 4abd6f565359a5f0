"""Independent float64 numpy formulations of the ops' equations: the ``*_ref`` of every op family.

Written from the paper's definitions, not from any backend, so they can judge all of them: the tests
(``tests/ops/``) compare every backend against these, and the benchmark harness judges its eager
reference against them (:func:`invcoss.benchmark.specs.oracle_error`),
so the two never drift apart (STYLE 25). Each takes and returns numpy float64 arrays; use
:func:`to_np` to bring a tensor of any dtype and device over exactly.

- :func:`tv_ref`: Eq. 8, per-sample weighted anisotropic L1 sums and their gradient.
- :func:`mean_var_ref`: the batch mean and biased variance (Eq. 9 of one batch).
- :func:`stat_matching_ref`: Eq. 3 for one layer and its gradient.
- :func:`repulsive_ref`: Eq. 5 and its gradient with respect to h.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["mean_var_ref", "repulsive_ref", "stat_matching_ref", "to_np", "tv_ref"]


def to_np(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a tensor of any float dtype and device (every value exact).

    Example:
        >>> to_np(torch.tensor([0.1], dtype=torch.bfloat16))
        array([0.10009766])
    """
    return t.detach().to("cpu", torch.float64, copy=True).numpy()  # never a view of t


def tv_ref(x: np.ndarray, weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8: per-sample weighted anisotropic L1 sums and their gradient with respect to x.

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        weights: one factor per spatial axis (default all 1).

    Returns:
        ``(sums, grad)``: sums ``(B,)``; grad like x, with sign(0) = 0.

    Example:
        >>> sums, grad = tv_ref(np.array([[[[0.0, 1.0, 1.0], [3.0, 1.0, 1.0]]]]))
        >>> sums, grad[0, 0]
        (array([6.]), array([[-2.,  1.,  0.],
               [ 2., -1.,  0.]]))
    """
    axes = range(2, x.ndim)
    weights = weights or [1.0] * (x.ndim - 2)
    sums = np.zeros(x.shape[0])
    grad = np.zeros_like(x)
    for axis, w in zip(axes, weights):
        d = np.diff(x, axis=axis)
        sums += w * np.abs(d).reshape(x.shape[0], -1).sum(1)
        s = np.sign(d)
        pad = [(0, 0)] * x.ndim
        lo, hi = list(pad), list(pad)
        lo[axis], hi[axis] = (1, 0), (0, 1)
        grad += w * (np.pad(s, lo) - np.pad(s, hi))  # +sign(d[i-1]) - sign(d[i])
    return sums, grad


def mean_var_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch mean and biased variance over axis 0.

    Example:
        >>> mean_var_ref(np.array([[2281.5], [2281.25]]))
        (array([2281.375]), array([0.015625]))
    """
    return x.mean(0), x.var(0)


def stat_matching_ref(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> tuple[float, np.ndarray]:
    """Eq. 3 for one layer and its gradient with respect to x (a zero norm gives no gradient).

    Args:
        x: ``(B, F)``; mu, var: ``(F,)``, the stored statistics.

    Example:
        >>> loss, grad = stat_matching_ref(np.array([[1.0, 2.0], [3.0, 6.0]]), np.array([2.0, 4.0]), np.ones(2))
        >>> float(loss), grad.tolist()
        (3.0, [[0.0, -2.0], [0.0, 2.0]])
    """
    b = x.shape[0]
    m, v = x.mean(0), x.var(0)
    dm, dv = m - mu, v - var
    nm, nv = np.linalg.norm(dm), np.linalg.norm(dv)
    gm = dm / nm if nm > 0 else np.zeros_like(dm)
    gv = dv / nv if nv > 0 else np.zeros_like(dv)
    grad = gm[None] / b + gv[None] * 2.0 * (x - m[None]) / b
    return nm + nv, grad


def repulsive_ref(h: np.ndarray, pool: np.ndarray, eps: float = 1e-8) -> tuple[float, np.ndarray]:
    """Eq. 5 and its gradient with respect to h, from the definition of the cosine.

    Args:
        h: ``(B, D)``; pool: ``(P, D)`` with P >= 1, not necessarily normalised.

    Example:
        >>> loss, grad = repulsive_ref(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0]]))
        >>> float(loss), grad[0].tolist()
        (0.75, [0.0, 0.0])
    """
    b, p = h.shape[0], pool.shape[0]
    nh = np.maximum(np.linalg.norm(h, axis=1, keepdims=True), eps)
    npool = np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), eps)
    hh, pp = h / nh, pool / npool
    c = hh @ pp.T  # (B, P)
    loss = (c**2).sum() / (b * p)
    # d/dh of c_ij^2 = 2 c_ij * (p^_j - c_ij h^_i) / |h_i|  (when |h_i| > eps)
    g_hat = 2.0 * (c @ pp) / (b * p)  # dL/dh^
    grad = (g_hat - (g_hat * hh).sum(1, keepdims=True) * hh) / nh
    return loss, grad
