"""Fixed sin-cos position embeddings for token grids of any dimensionality (2D images, 3D volumes).

One axis of length ``n`` at width ``d`` (``d`` even) gets the 1-D table of Vaswani et al.:
``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (d / 2))`` for ``k < d / 2``. A grid
concatenates one such table per axis along the feature dimension (first axis first: depth, then
height, then width), as the 2D tables of facebookresearch/mae do, extended to 3D. The width is split
as evenly as the sin/cos pairs allow, the last axis taking the remainder, so any even width works
for any number of axes (768 over 3 axes: 256 each; 128 over 3 axes: 42, 42, 44).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinCosPosEmbed", "axis_widths", "sincos_pos_embed"]


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


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """The fixed position table of a token grid, in raster order (last axis fastest).

    Args:
        grid: tokens per axis, e.g. ``(14, 14)`` or ``(1, 12, 12)``.
        dim: feature width (even).

    Returns:
        ``(prod(grid), dim)`` float32 tensor.

    Example:
        >>> sincos_pos_embed((1, 12, 12), 96).shape
        torch.Size([144, 96])
    """
    widths = axis_widths(dim, len(grid))
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    parts = [
        _axis_table(n, w)[c.reshape(-1)] for n, w, c in zip(grid, widths, coords, strict=True)
    ]  # each (N, w)
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

    def __init__(self, grid: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_patches = math.prod(self.grid)
        self.register_buffer("table", sincos_pos_embed(self.grid, dim)[None], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.table.to(tokens.dtype)
