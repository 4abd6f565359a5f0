"""What "matches the reference" means in the op tests: every tolerance, in one place.

Every op test compares a result with the float64 numpy reference of :mod:`invcoss.benchmark.refs`
(computed from the very inputs the backend saw, already rounded to their dtype) through
:func:`assert_matches`. Errors are measured against the scale of the reference, ``s = max |r|``
(absolute when the reference is all zeros), so that one rule fits losses of size 1 and gradients
of size 1e-6 alike; where cancellation makes a result much smaller than the terms it is summed
from (the repulsive gradient, whose projection removes the component along h), ``s`` is the
magnitude of those terms instead, as rounding errors scale with them:

fp64 and fp32 (SPEC 6)
    elementwise ``|a - r| <= rtol * |r| + atol * s`` with ``TOL[dtype]``: fp32 within 1e-5, or 1e-4
    for reductions over more than 1e6 elements (``numel``).

bf16 and fp16: two bars, both must hold
    1. SPEC 6: elementwise within 1e-2 (``TOL[dtype]``, as above).
    2. STYLE 24, flash-attention's rule (``tests/cute/test_flash_attn.py``: the kernel's error is at
       most ``rtol = 2`` times that of a PyTorch implementation in the same dtype, plus a noise
       floor): ``max |a - r| <= K * max |p - r| + floor`` with **K = 2**, where ``p`` is the same
       computation written in plain PyTorch in that dtype (:func:`plain_tv`, :func:`plain_mean_var`,
       :func:`plain_stat_matching`, :func:`plain_repulsive`, differentiated by autograd: every
       intermediate rounded to the dtype, as a user writing the op by hand would get) and
       ``floor = 2 * max |(r + 0.3) - 0.3 - r|`` evaluated in fp32, twice the rounding noise of fp32
       at the reference's magnitude (flash-attention's ``fwd_atol``; our kernels accumulate in fp32,
       SPEC 2, and an exact plain result must not demand an exact kernel result). No op needed more
       than K = 2. One exception, of the test machinery rather than the kernels: the Triton
       interpreter (``TRITON_INTERPRET=1``, Triton 3.x ``triton/runtime/interpreter.py``,
       ``cast_impl``) converts fp32 to bf16 by truncation, where PyTorch and the GPU round to nearest,
       so a bf16 result written by an interpreted kernel may be off by one unit in the last place
       instead of half of one (measured: up to 2.8 times plain PyTorch's error). For those results the
       floor adds one bf16 unit in the last place at the reference's largest magnitude
       (``backend=`` tells :func:`assert_matches` where a result came from).

A few properties have their own bar from the SPEC, named here: the running statistics (SPEC 2.2,
``RUNNING_STATS``) and the Welford hard cases (:func:`welford_hard`); the two paths of the repulsive
pool (SPEC 2.3) use the fp32 tolerance, which is the SPEC's 1e-5.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from invcoss.benchmark.refs import to_np
from tests.ops.backends import interpreted

K = 2  # STYLE 24: at most twice the error of plain PyTorch in the same dtype
LOW_PRECISION = (torch.float16, torch.bfloat16)

# SPEC 6. fp64 is the torch, cpu and cuda backends' exact mode (gradcheck runs there).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
LARGE_REDUCTION = 1_000_000  # SPEC 6: fp32 reductions over more elements get 1e-4
LARGE_REDUCTION_FP32 = dict(rtol=1e-4, atol=1e-4)

# SPEC 2.2: data of mean 1e4 and std 1 fed in batches of mixed sizes: var within 1e-4 relative of
# float64 numpy; the mean (an easy sum) within 1e-6.
RUNNING_STATS = dict(mean_rtol=1e-6, var_rtol=1e-4)
# Large mean, small spread (one-pass sums give 0 there, PyTorch issue 40302): the batch variance of
# fp32 data within 1e-6 relative of float64 numpy from the fused kernels, which accumulate in fp32 on
# data shifted by its first row (measured: 3e-7 at worst over 60 seeds), and within SPEC 2.2's 1e-4
# from the torch reference, two plain passes in fp32 (measured: 2.5e-6). The running state, fp64,
# gets the fused kernels' bar on every backend.
WELFORD_HARD_FUSED = dict(rtol=1e-6, atol=0.0)
WELFORD_HARD_REFERENCE = dict(rtol=RUNNING_STATS["var_rtol"], atol=0.0)


def welford_hard(backend: str) -> dict:
    """The bar of the Welford hard cases for the batch variance from ``backend``."""
    return WELFORD_HARD_REFERENCE if backend == "torch" else WELFORD_HARD_FUSED


def tol(dtype: torch.dtype, numel: int = 0) -> dict:
    """``rtol`` and ``atol`` for a result computed from inputs of ``dtype`` (SPEC 6)."""
    if dtype == torch.float32 and numel > LARGE_REDUCTION:
        return LARGE_REDUCTION_FP32
    return TOL[dtype]


def _np(v: Tensor | np.ndarray | float) -> np.ndarray:
    return to_np(v) if isinstance(v, Tensor) else np.asarray(v, dtype=np.float64)


def assert_matches(
    actual: Tensor,
    expected: Tensor | np.ndarray | float,
    dtype: torch.dtype,
    numel: int = 0,
    plain: Tensor | None = None,
    backend: str | None = None,
    scale: float | None = None,
) -> None:
    """Assert ``actual`` matches the float64 reference ``expected`` for inputs of ``dtype``.

    Args:
        actual: the result of the backend under test.
        expected: the reference (float64 numpy, or a tensor taken exactly).
        dtype: the dtype of the inputs that produced ``actual``.
        numel: elements reduced (SPEC 6's looser fp32 bar above 1e6).
        plain: for bf16/fp16, the same result from plain PyTorch in ``dtype`` (the STYLE 24 bar).
        backend: the backend that computed ``actual`` (the interpreter's bf16 truncation).
        scale: the magnitude of the terms ``expected`` is summed from (default ``max |expected|``).
    """
    a, r = _np(actual), _np(expected)
    assert a.shape == r.shape, f"shape {a.shape}, expected {r.shape}"
    if scale is None:
        scale = float(np.abs(r).max()) if r.size else 0.0
    t = tol(dtype, numel)
    bound = t["rtol"] * np.abs(r) + t["atol"] * (scale if scale > 0 else 1.0)
    err = np.abs(a - r)
    bad = ~(err <= bound)  # NaN counts as bad
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.size} values off for {dtype} (rtol {t['rtol']}, atol {t['atol']} x {scale:.3g}): "
        f"max error {float(np.nanmax(err)) if err.size else 0:.3g} at {np.unravel_index(np.argmax(err), err.shape)}"
    )
    if dtype in LOW_PRECISION:
        assert plain is not None, "a bf16/fp16 comparison needs the plain PyTorch result in that dtype"
        p = _np(plain)
        r32 = torch.from_numpy(r).float()
        floor = 2 * float(((r32 + 0.3) - 0.3 - r32).abs().max()) if r.size else 0.0
        if backend is not None and interpreted(backend) and actual.dtype == torch.bfloat16 and scale > 0:
            floor += 2.0 ** (np.floor(np.log2(scale)) - 7)  # one bf16 ulp: 8 significant bits
        ours, theirs = float(err.max()) if err.size else 0.0, float(np.abs(p - r).max()) if r.size else 0.0
        assert ours <= K * theirs + floor, (
            f"{dtype}: max error {ours:.3g} > {K} x plain PyTorch's {theirs:.3g} + floor {floor:.3g}"
        )


# ---- plain PyTorch in the input's dtype: the yardstick of the STYLE 24 bar ----------------------


def plain_tv(x: Tensor, weights: list[float] | tuple[float, ...]) -> Tensor:
    """Eq. 8 per sample ``(B,)`` with every operation in ``x.dtype``."""
    total = (x * 0).flatten(1).sum(1)  # keeps the graph when every axis has length 1
    for axis, w in enumerate(weights, start=2):
        total = total + w * torch.diff(x, dim=axis).abs().flatten(1).sum(1)
    return total


def plain_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance over dim 0 in ``x.dtype``."""
    mean = x.mean(0)
    return mean, (x - mean).square().mean(0)


def plain_stat_matching(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Eq. 3 for one layer in ``x.dtype``."""
    m, v = plain_mean_var(x)
    return torch.linalg.vector_norm(m - mean.to(x.dtype)) + torch.linalg.vector_norm(v - var.to(x.dtype))


def plain_repulsive(h: Tensor, pool: Tensor, eps: float = 1e-8) -> Tensor:
    """Eq. 5 in ``h.dtype``."""
    hh = h / h.norm(dim=1, keepdim=True).clamp_min(eps)
    p = pool.to(h.dtype)
    pp = p / p.norm(dim=1, keepdim=True).clamp_min(eps)
    return (hh @ pp.T).square().mean()


def plain_with_grad(fn, x: Tensor, *args, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``fn(x, *args)`` in x's dtype and its gradient with respect to x, for ``upstream`` (default 1)."""
    xp = x.detach().clone().requires_grad_()
    out = fn(xp, *args)
    out.backward(torch.ones_like(out) if upstream is None else upstream.to(out.dtype))
    return out.detach(), xp.grad
