"""Total variation (Eq. 8): the image prior L_img of the inversion objective."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor, nn

from invcoss.ops.checks import check_nonempty, check_tensor, shape_str
from invcoss.ops.dispatch import resolve

_REDUCTIONS = ("mean", "sum", "none")


def total_variation(
    x: Tensor,
    reduction: str = "mean",
    weights: Sequence[float] | None = None,
    backend: str | None = None,
) -> Tensor:
    """Anisotropic L1 total variation of a batch of images or volumes (Eq. 8).

    The sum of ``|x[i+1] - x[i]|`` along every spatial axis (depth too for 5-D input). A spatial
    axis of length 1 contributes 0. The gradient uses sign(0) = 0, as ``torch.abs`` does. A NaN or
    inf in x comes out in the result (never hidden); an empty x is an error (see the README's table
    of bad input).

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` with no zero-length axis, fp16/bf16/fp32 (fp64
            on the torch and cpu backends), contiguous or not.
        reduction: ``"mean"`` (the sum divided by ``x.numel()``), ``"sum"`` (over batch, channels
            and axes) or ``"none"`` (per-sample sums, shape ``(B,)``).
        weights: optional factor per spatial axis (in the order of x's axes), each finite and
            >= 0, e.g. the inverse voxel spacing for anisotropic volumes. Default: all ones.
        backend: ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"`` or None for the default.

    Returns:
        fp32 tensor: 0-dim for ``"mean"``/``"sum"``, ``(B,)`` for ``"none"``.

    Raises:
        TypeError: x is not a floating tensor.
        ValueError: wrong rank, an empty x (B = 0 or another zero-length axis), unknown reduction,
            wrong number of weights or a negative or non-finite one, unknown backend.
        RuntimeError: the requested backend is not available here.

    Example:
        >>> x = torch.tensor([[[[0.0, 1.0], [3.0, 1.0]]]])
        >>> total_variation(x, reduction="sum", backend="torch")  # |1-0| + |1-3| + |3-0| + |1-1|
        tensor(6.)
    """
    op = "total_variation"
    check_tensor(op, "x", x)
    if x.ndim not in (4, 5):
        raise ValueError(f"{op} expects x of shape (B, C, H, W) or (B, C, D, H, W), got {shape_str(x.shape)}")
    check_nonempty(op, "x", x, "(B, C, H, W) or (B, C, D, H, W)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op} expects reduction in {_REDUCTIONS}, got {reduction!r}")
    n_axes = x.ndim - 2
    if weights is None:
        w = (1.0,) * n_axes
    else:
        w = tuple(float(v) for v in weights)
        if len(w) != n_axes:
            raise ValueError(
                f"{op} expects weights with one factor per spatial axis ({n_axes}), got {len(w)}"
            )
        if not all(math.isfinite(v) and v >= 0 for v in w):
            raise ValueError(f"{op} expects weights that are finite and >= 0, got {w}")
    per_sample = resolve(backend, x.device, op).tv(x, w)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total / x.numel() if reduction == "mean" else total


class TotalVariation(nn.Module):
    """Module form of :func:`total_variation`; it only delegates.

    Example:
        >>> TotalVariation(reduction="sum", backend="torch")(torch.ones(2, 1, 4, 4))
        tensor(0.)
    """

    def __init__(
        self, reduction: str = "mean", weights: Sequence[float] | None = None, backend: str | None = None
    ) -> None:
        super().__init__()
        self.reduction, self.weights, self.backend = reduction, weights, backend

    def forward(self, x: Tensor) -> Tensor:
        return total_variation(x, self.reduction, self.weights, self.backend)


__all__ = ["total_variation", "TotalVariation"]
