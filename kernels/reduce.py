"""The deterministic second stage of every two-stage reduction in :mod:`invcoss.kernels`.

First-stage kernels write one fp32 partial per program (never a float atomic); this kernel then sums
each row of partials in a fixed order, so two runs on the same input give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from invcoss.kernels.launch import launch

# Launch parameters of this untuned kernel (kernels/aot.py compiles exactly these).
ROW_SUM_LAUNCH = {"BLOCK": 1024, "num_warps": 4, "num_stages": 1}


@triton.jit
def row_sum_kernel(
    in_ptr,  # (n_rows, n_cols) fp32 partials, contiguous
    out_ptr,  # (n_rows,) fp32
    n_cols,
    scale,
    BLOCK: tl.constexpr,
):
    # grid: (n_rows,). One program sums one row of partials, BLOCK at a time, in a fixed order,
    # and writes scale * sum.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        mask = c0 + cols < n_cols
        acc += tl.load(in_ptr + row * n_cols + c0 + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0) * scale)


def row_sum(partials: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * partials.sum(1)`` for fp32 ``partials`` ``(R, N)``, in a fixed order; ``(R,)`` fp32."""
    n_rows, n_cols = partials.shape
    out = torch.empty(n_rows, device=partials.device, dtype=torch.float32)
    launch(row_sum_kernel, (n_rows,), partials, out, n_cols, scale, **ROW_SUM_LAUNCH)
    return out
