"""Fixed sin-cos position embeddings for token grids of any dimensionality (2D images, 3D volumes).

One axis of length ``n`` at width ``d`` (``d`` even) gets the 1-D table of Vaswani et al.:
``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (d / 2))`` for ``k < d / 2``. A grid
concatenates one such table per axis along the feature dimension, in one of two orders
(:data:`POS_EMBED_ORDERS`):

* ``"invcoss"`` (the default, the table of every shipped model and existing checkpoint): first axis
  first, i.e. depth, then height, then width.
* ``"mae"``: last axis first, i.e. width then height (then depth), the order of
  facebookresearch/mae's ``get_2d_sincos_pos_embed``, whose ``np.meshgrid(grid_w, grid_h)`` puts
  the column coordinate in the first half. Public MAE weights were trained with this table
  (:mod:`invcoss.models.public_weights` detects it).

The width is split as evenly as the sin/cos pairs allow, the last table taking the remainder, so
any even width works for any number of axes (768 over 3 axes: 256 each; 128 over 3 axes: 42, 42,
44).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["POS_EMBED_ORDERS", "SinCosPosEmbed", "axis_widths", "sincos_pos_embed"]

POS_EMBED_ORDERS = ("invcoss", "mae")


def axis_widths(dim: int, num_axes: int) -> list[int]:
    """How many of ``dim`` features encode each axis: even numbers that sum to ``dim``.

    Raises:
        ValueError: if ``dim`` is odd or too small to give every axis one sin/cos pair.

    Example:
        >>> axis_widths(768, 3), axis_widths(128, 3)
        ([256, 256, 256], [42, 42, 44])
    """
    if dim % 2 or dim < 2 * num_axes:
        raise ValueError(
            f"sin-cos position embedding needs an even width of at least {2 * num_axes} for "
            f"{num_axes} axes, got {dim}"
        )
    base = (dim // (2 * num_axes)) * 2
    return [base] * (num_axes - 1) + [dim - base * (num_axes - 1)]


def _axis_table(length: int, width: int) -> torch.Tensor:
    # float64 so the table is the same on every device and dtype it is later cast to.
    pos = torch.arange(length, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = pos[:, None] * omega[None, :]  # (length, width/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (length, width)


def sincos_pos_embed(grid: tuple[int, ...], dim: int, order: str = "invcoss") -> torch.Tensor:
    """The fixed position table of a token grid, in raster order (last axis fastest).

    Args:
        grid: tokens per axis, e.g. ``(14, 14)`` or ``(1, 12, 12)``.
        dim: feature width (even).
        order: ``"invcoss"`` (first axis in the first features) or ``"mae"`` (last axis first, as
            facebookresearch/mae); see the module docstring.

    Returns:
        ``(prod(grid), dim)`` float32 tensor.

    Example:
        >>> sincos_pos_embed((1, 12, 12), 96).shape
        torch.Size([144, 96])
        >>> a, b = sincos_pos_embed((2, 3), 8), sincos_pos_embed((2, 3), 8, "mae")
        >>> bool((a[:, :4] == b[:, 4:]).all())  # the same two halves, swapped
        True
    """
    if order not in POS_EMBED_ORDERS:
        raise ValueError(f"sin-cos position table order must be one of {POS_EMBED_ORDERS}, got {order!r}")
    widths = axis_widths(dim, len(grid))
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    axes = list(zip(grid, coords, strict=True))
    if order == "mae":
        axes.reverse()
    parts = [_axis_table(n, w)[c.reshape(-1)] for (n, c), w in zip(axes, widths, strict=True)]  # each (N, w)
    return torch.cat(parts, dim=1).float()  # (N, dim)


class SinCosPosEmbed(nn.Module):
    """Adds a fixed sin-cos table to ``(B, N, D)`` patch tokens (the class token is not included).

    The class token's position in facebookresearch/mae is an all-zero row, so it is left out here and
    the class token is used as it is. The table is a non-persistent buffer rebuilt from the grid:
    checkpoints do not depend on the input size, and a model can be loaded at another resolution.

    Example:
        >>> pe = SinCosPosEmbed((7, 7), 64)
        >>> pe(torch.zeros(2, 49, 64)).shape
        torch.Size([2, 49, 64])
    """

    def __init__(self, grid: tuple[int, ...], dim: int, order: str = "invcoss") -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_patches = math.prod(self.grid)
        self.register_buffer("table", sincos_pos_embed(self.grid, dim, order)[None], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.table.to(tokens.dtype)
