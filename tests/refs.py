"""Independent float64 numpy formulations of the ops' equations, and the tolerances per dtype.

Tests compare every backend against these (or against the torch reference backend, which is
itself checked against these); benchmarks import the reference from here too, so they never drift.
"""

from __future__ import annotations

import numpy as np
import torch

# SPEC 6: fp32 within 1e-5 relative (1e-4 for reductions over more than 1e6 elements), bf16/fp16 1e-2.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
LARGE_REDUCTION_FP32 = dict(rtol=1e-4, atol=1e-4)


def tol(dtype: torch.dtype, numel: int = 0) -> dict:
    """Tolerances for comparing a result computed from inputs of ``dtype``."""
    if dtype == torch.float32 and numel > 1_000_000:
        return LARGE_REDUCTION_FP32
    return TOL[dtype]


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def tv_ref(x: np.ndarray, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8: per-sample weighted anisotropic L1 sums (B,) and their gradient w.r.t. x."""
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
    """Batch mean and biased variance over axis 0."""
    return x.mean(0), x.var(0)


def stat_matching_ref(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> tuple[float, np.ndarray]:
    """Eq. 3 for one layer and its gradient w.r.t. x (zero-norm terms contribute no gradient)."""
    b = x.shape[0]
    m, v = x.mean(0), x.var(0)
    dm, dv = m - mu, v - var
    nm, nv = np.linalg.norm(dm), np.linalg.norm(dv)
    gm = dm / nm if nm > 0 else np.zeros_like(dm)
    gv = dv / nv if nv > 0 else np.zeros_like(dv)
    grad = gm[None] / b + gv[None] * 2.0 * (x - m[None]) / b
    return nm + nv, grad


def repulsive_ref(h: np.ndarray, pool: np.ndarray, eps: float = 1e-8) -> tuple[float, np.ndarray]:
    """Eq. 5 and its gradient w.r.t. h, from the definition of the cosine."""
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
