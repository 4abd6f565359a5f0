"""The ``cpu`` and ``cuda`` backends: the backend contract over the compiled ops ``torch.ops.invcoss.*``.

The kernels live in ``csrc/`` (``*_cpu.cpp`` with OpenMP, ``*_cuda.cu``) and register under the
namespace ``invcoss`` for the CPU and CUDA dispatch keys. This module adds what the compiled
library leaves to Python, so that the ops work in eager mode, under autograd and under
``torch.compile(fullgraph=True)``:

* a fake (meta) kernel for every op (``torch.library.register_fake``): output shapes and dtypes;
* the backward of every differentiable op (``torch.library.register_autograd``).

Backward passes: ``tv`` saves x only and recomputes its gradient from x and the incoming per-sample
gradient in one streaming pass (``tv_backward``: x read, grad written once; a gradient kept from
the forward pass would cost a full-size buffer and one more write and read). ``repulsive_direct`` and
``repulsive_gram`` compute d(output)/d(input) during the forward pass when the input requires grad
(it costs little there: the matmul result is at hand) and return it as a second, non-differentiable
output; their backward only scales it by the incoming gradient (``scale_rows``). ``batch_mean_var``
and ``stat_matching`` save the batch mean (and the loss's unit directions) and recompute
``x - mean`` in one streaming pass in ``batch_mean_var_backward``. Double backward: ``tv_backward``
is differentiable (zero with respect to x, where the gradient is piecewise constant, and exact with
respect to the incoming gradient); the other backward ops are not.

Without the extension the module still imports (so that ``pytest --doctest-modules`` and
introspection work) but registers nothing; :mod:`invcoss.ops.dispatch` then reports the backend
unavailable, with the reason, and never calls into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from invcoss import _ext

_ops = torch.ops.invcoss  # resolved at call time


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _wants_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


# ---- backend contract (see invcoss.ops.dispatch) --------------------------------------------------


def tv(x: Tensor, weights: Sequence[float]) -> Tensor:
    """Per-sample weighted anisotropic L1 sums ``(B,)`` of x ``(B, C, *S)``."""
    return _ops.tv(x, [float(w) for w in weights])


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and biased variance of x ``(N, F)``."""
    mean, var = _ops.batch_mean_var(x)
    return mean, var


def welford_update(x: Tensor, count: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Fold x ``(N, F)`` into the state ``(count, mean, m2)`` (Chan et al.); no autograd."""
    new_mean, new_m2 = _ops.welford_update(x.detach(), int(count), mean, m2)
    return new_mean, new_m2


def stat_matching(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``||mean_N(x) - mean||_2 + ||var_N(x) - var||_2`` as a 0-dim tensor."""
    loss, _, _, _ = _ops.stat_matching(x, mean, var)
    return loss


def repulsive_direct(h: Tensor, pool: Tensor, eps: float, pool_inv_norm: Tensor | None = None) -> Tensor:
    """Eq. 5 of h ``(B, D)`` against pool ``(P, D)`` (rows' inverse norms ``(P,)`` fp32 if known)."""
    loss, _ = _ops.repulsive_direct(h, pool.detach(), float(eps), _wants_grad(h), pool_inv_norm)
    return loss


def repulsive_gram(h: Tensor, gram: Tensor, count: int, eps: float) -> Tensor:
    """Eq. 5 of h ``(B, D)`` from the pool's Gram matrix ``(D, D)`` of ``count`` rows."""
    loss, _ = _ops.repulsive_gram(h, gram.detach(), int(count), float(eps), _wants_grad(h))
    return loss


def gram_update(gram: Tensor, feats_hat: Tensor, alpha: float) -> None:
    """In place ``gram += alpha * feats_hat^T feats_hat``."""
    _ops.gram_update(gram, feats_hat.detach(), float(alpha))


# ---- fake kernels (shapes and dtypes for torch.compile and meta tensors) ---------------------------


def _grad_like(t: Tensor, with_grad: bool) -> Tensor:
    # The kernels return a fresh contiguous gradient, or an empty placeholder without one.
    return t.new_empty(t.shape) if with_grad else t.new_empty((0,))


def _tv_fake(x: Tensor, weights: Sequence[float]) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=_acc_dtype(x))


def _tv_backward_fake(x: Tensor, weights: Sequence[float], grad_sums: Tensor) -> Tensor:
    return x.new_empty(x.shape)  # contiguous, x's dtype


def _scale_rows_fake(grad: Tensor, scale: Tensor) -> Tensor:
    return grad.new_empty(grad.shape)


def _batch_mean_var_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    f = x.new_empty((x.shape[1],), dtype=_acc_dtype(x))
    return f, torch.empty_like(f)


def _batch_mean_var_backward_fake(x: Tensor, mean: Tensor, grad_mean: Tensor, grad_var: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _welford_update_fake(x: Tensor, count: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    return mean.new_empty(mean.shape), m2.new_empty(m2.shape)


def _stat_matching_fake(x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dt = _acc_dtype(x)
    f = x.new_empty((x.shape[1],), dtype=dt)
    return x.new_empty((), dtype=dt), f, torch.empty_like(f), torch.empty_like(f)


def _repulsive_direct_fake(
    h: Tensor, pool: Tensor, eps: float, with_grad: bool, pool_inv_norm: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return h.new_empty((), dtype=_acc_dtype(h)), _grad_like(h, with_grad)


def _repulsive_gram_fake(
    h: Tensor, gram: Tensor, count: int, eps: float, with_grad: bool
) -> tuple[Tensor, Tensor]:
    return h.new_empty((), dtype=_acc_dtype(h)), _grad_like(h, with_grad)


def _gram_update_fake(gram: Tensor, feats_hat: Tensor, alpha: float) -> None:
    return None


# ---- autograd ---------------------------------------------------------------------------------------


def _save_fused_grad(ctx, inputs, output) -> None:
    # output = (value, d value / d input computed in the forward pass)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _scale_fused_grad(ctx, grad_value: Tensor, _grad_of_grad: Tensor | None):
    (fused,) = ctx.saved_tensors
    if fused.numel() == 0 and fused.dim() == 1:
        raise RuntimeError(
            "invcoss: backward through an op whose forward ran without with_grad=True "
            "(the input did not require grad when the op ran)"
        )
    scale = grad_value.reshape(-1).expand(fused.shape[0])  # the one scalar of a repulsive loss
    return _ops.scale_rows(fused, scale)


def _tv_setup(ctx, inputs, output) -> None:
    x, weights = inputs
    ctx.weights = list(weights)
    ctx.save_for_backward(x)


def _tv_backward(ctx, grad_sums: Tensor):
    (x,) = ctx.saved_tensors
    return _ops.tv_backward(x, ctx.weights, grad_sums), None


def _tv_backward_setup(ctx, inputs, output) -> None:
    x, weights, grad_sums = inputs
    ctx.weights, ctx.scale_dtype = list(weights), grad_sums.dtype
    ctx.save_for_backward(x)


def _tv_backward_backward(ctx, grad_grad: Tensor):
    # The gradient is piecewise constant in x (zero second derivative, as torch.abs has) and linear
    # in grad_sums: d<grad_grad, grad>/d grad_sums[b] = <grad_grad[b], d(sums[b])/dx[b]>.
    (x,) = ctx.saved_tensors
    unit = _ops.tv_backward(x, ctx.weights, x.new_ones((x.shape[0],), dtype=_acc_dtype(x)))
    acc = _acc_dtype(x)
    d_scale = (grad_grad.to(acc) * unit.to(acc)).flatten(1).sum(1)
    return None, None, d_scale.to(ctx.scale_dtype)


def _repulsive_direct_backward(ctx, grad_loss: Tensor, grad_fused: Tensor | None):
    return _scale_fused_grad(ctx, grad_loss, grad_fused), None, None, None, None


def _repulsive_gram_backward(ctx, grad_loss: Tensor, grad_fused: Tensor | None):
    return _scale_fused_grad(ctx, grad_loss, grad_fused), None, None, None, None


def _batch_mean_var_setup(ctx, inputs, output) -> None:
    (x,) = inputs
    mean, _ = output
    ctx.save_for_backward(x, mean)


def _batch_mean_var_backward(ctx, grad_mean: Tensor | None, grad_var: Tensor | None):
    x, mean = ctx.saved_tensors
    gm = grad_mean if grad_mean is not None else torch.zeros_like(mean)
    gv = grad_var if grad_var is not None else torch.zeros_like(mean)
    return _ops.batch_mean_var_backward(x, mean, gm, gv)


def _stat_matching_setup(ctx, inputs, output) -> None:
    x = inputs[0]
    _, bmean, g_mean, g_var = output
    ctx.mark_non_differentiable(bmean, g_mean, g_var)
    ctx.save_for_backward(x, bmean, g_mean, g_var)


def _stat_matching_backward(ctx, grad_loss: Tensor, *_unused: Tensor | None):
    x, bmean, g_mean, g_var = ctx.saved_tensors
    g = grad_loss.to(g_mean.dtype)
    return _ops.batch_mean_var_backward(x, bmean, g * g_mean, g * g_var), None, None


_FAKES = {
    "invcoss::tv": _tv_fake,
    "invcoss::tv_backward": _tv_backward_fake,
    "invcoss::scale_rows": _scale_rows_fake,
    "invcoss::batch_mean_var": _batch_mean_var_fake,
    "invcoss::batch_mean_var_backward": _batch_mean_var_backward_fake,
    "invcoss::welford_update": _welford_update_fake,
    "invcoss::stat_matching": _stat_matching_fake,
    "invcoss::repulsive_direct": _repulsive_direct_fake,
    "invcoss::repulsive_gram": _repulsive_gram_fake,
    "invcoss::gram_update": _gram_update_fake,
}
# welford_update (no gradient by contract), gram_update (in place, on a constant), scale_rows and
# batch_mean_var_backward are not differentiable; tv_backward is (double backward of tv).
_BACKWARDS = {
    "invcoss::tv": (_tv_backward, _tv_setup),
    "invcoss::tv_backward": (_tv_backward_backward, _tv_backward_setup),
    "invcoss::repulsive_direct": (_repulsive_direct_backward, _save_fused_grad),
    "invcoss::repulsive_gram": (_repulsive_gram_backward, _save_fused_grad),
    "invcoss::batch_mean_var": (_batch_mean_var_backward, _batch_mean_var_setup),
    "invcoss::stat_matching": (_stat_matching_backward, _stat_matching_setup),
}

if _ext.C is not None:
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(_name, _fake)
    for _name, (_backward, _setup) in _BACKWARDS.items():
        torch.library.register_autograd(_name, _backward, setup_context=_setup)
