"""The ``torch`` backend: the reference implementation of every op, written for clarity.

This is the ground truth the Triton and C++/CUDA kernels are tested against. It is plain PyTorch,
so autograd and ``torch.compile`` trace straight through it (no custom op is needed, and compile
can fuse it with its neighbours). The function signatures are the backend contract documented in
:mod:`invcoss.ops.dispatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from invcoss.ops.moments import chan_merge


def _acc(t: Tensor) -> Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck is exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def tv(x: Tensor, weights: tuple[float, ...]) -> Tensor:
    """Per-sample weighted anisotropic L1 total variation (Eq. 8). x: (B, C, *S) -> (B,) fp32."""
    xf = _acc(x)
    total = (xf * 0).flatten(1).sum(1)  # zeros that keep the graph when every axis has length 1
    for axis, w in enumerate(weights, start=2):
        if x.shape[axis] < 2:
            continue
        d = torch.diff(xf, dim=axis).abs()  # forward differences along one spatial axis
        total = total + w * d.flatten(1).sum(1)
    return total


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and biased variance of x (N, F) in fp32."""
    xf = _acc(x)
    mean = xf.mean(0)
    var = (xf - mean).square().mean(0)
    return mean, var


def welford_update(x: Tensor, count: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Fold x (N, F) into the state (count, mean, m2) with Chan et al.'s parallel merge (Eq. 9)."""
    xs = x.detach().to(mean.dtype)
    mean_b = xs.mean(0)
    m2_b = (xs - mean_b).square().sum(0)
    _, new_mean, new_m2 = chan_merge(count, mean, m2, xs.shape[0], mean_b, m2_b)
    return new_mean, new_m2


def stat_matching(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """||mean_N(x) - mean||_2 + ||var_N(x) - var||_2 (Eq. 3, one layer) as 0-dim fp32."""
    bmean, bvar = batch_mean_var(x)
    return _safe_norm(bmean - mean.to(bmean.dtype)) + _safe_norm(bvar - var.to(bvar.dtype))


def _safe_norm(v: Tensor) -> Tensor:
    # torch.linalg.norm has a NaN gradient at 0; the spec asks for a zero gradient there. Only an
    # exact 0 is special-cased, so a NaN or inf in v still comes out as NaN or inf.
    sq = v.square().sum()
    zero = sq == 0
    safe = torch.where(zero, torch.ones_like(sq), sq)
    return torch.where(zero, torch.zeros_like(sq), safe.sqrt())


def _normalise(v: Tensor, eps: float) -> Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(eps)


def repulsive_direct(h: Tensor, pool: Tensor, eps: float, pool_inv_norm: Tensor | None = None) -> Tensor:
    """1/(B P) sum_ij cos(h_i, p_j)^2 (Eq. 5) through the B x P similarity matrix."""
    hh = _normalise(_acc(h), eps)
    p = pool.detach().to(hh.dtype)
    pp = _normalise(p, eps) if pool_inv_norm is None else p * pool_inv_norm.to(hh.dtype)[:, None]
    sim = hh @ pp.T  # (B, P)
    return sim.square().mean()


def repulsive_gram(h: Tensor, gram: Tensor, count: int, eps: float) -> Tensor:
    """The same loss as :func:`repulsive_direct` from G = sum_j p^_j p^_j^T: mean_i h^_i^T G h^_i / P."""
    hh = _normalise(_acc(h), eps)
    quad = ((hh @ gram.detach().to(hh.dtype)) * hh).sum(1)  # (B,)
    return quad.mean() / count


def gram_update(gram: Tensor, feats_hat: Tensor, alpha: float) -> None:
    """In place gram += alpha * feats_hat^T feats_hat (a rank-K update)."""
    f = feats_hat.to(gram.dtype)
    gram.addmm_(f.T, f, alpha=alpha)
