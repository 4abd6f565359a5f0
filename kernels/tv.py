"""Total variation (Eq. 8): one pass over x gives the per-sample sums and the gradient.

``x`` is ``(B, C, H, W)`` or ``(B, C, D, H, W)``; a 2-D image is a volume of depth 1. The loss is
``sum w_a |x[i+1] - x[i]|`` along every spatial axis ``a``, and its gradient at i is
``w_a (sign(x[i] - x[i-1]) - sign(x[i+1] - x[i]))`` with sign(0) = 0. Both need the same neighbours,
so the forward kernel writes the gradient (when x requires it) while it computes the loss: backward is
then a per-sample scale, the pattern of Liger's fused cross-entropy. HBM traffic is one read of x and
one write of the gradient; the neighbour loads of a tile hit L1/L2.

Work decomposition. A program owns a fixed work unit, a group of ``GROUP_D x GROUP_H x GROUP_W``
voxels of one ``(b, c)`` plane, and walks it in ``BLOCK_H x BLOCK_W`` tiles (the autotuned part),
stepping through depth with the previous slice's difference sign carried in registers. Because the
unit does not depend on the tile config, the partials buffer and the grid do not either: the
autotuner may pick any config without leaving stale partials behind. The per-sample sums are then
reduced in a fixed order by :func:`invcoss.kernels.reduce.row_sum` (no float atomics: deterministic).

Strides. x is read through its strides, so a non-contiguous x is never copied; the gradient is written
contiguous. Loads coalesce when W is the unit-stride axis (the usual NCHW/NCDHW layout); a
channels-last input is read correctly at lower bandwidth, which still beats a full copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from invcoss.kernels.launch import autotune, config, define_op, launch, scale_saved_grad
from invcoss.kernels.reduce import row_sum

# The work unit of one program (see the module doc); every BLOCK_* of the configs divides it.
GROUP_D, GROUP_H, GROUP_W = 4, 32, 256

# Memory-bound stencil on Hopper: four voxels per thread and per load. Each voxel keeps its centre,
# six neighbours and the carried depth sign live across the depth loop; at eight voxels per thread
# ptxas needs ~190 registers (or spills), at four it needs ~95 (ahead-of-time table, kernels/aot.py).
TV_CONFIGS = [
    config(4, 2, BLOCK_H=4, BLOCK_W=128),
    config(4, 2, BLOCK_H=8, BLOCK_W=64),
    config(4, 2, BLOCK_H=2, BLOCK_W=256),
]
TV_INTERPRET_CONFIG = config(4, 1, BLOCK_H=16, BLOCK_W=64)


@autotune(TV_CONFIGS, key=["D", "H", "W"], interpret=TV_INTERPRET_CONFIG)
@triton.jit
def tv_forward_kernel(
    x_ptr,  # (B, C, D, H, W) any strides
    grad_ptr,  # (B, C, D, H, W) contiguous, x's dtype; unused without HAS_GRAD
    partial_ptr,  # (B * C * n_dg * n_hg * n_wg,) fp32
    C,
    D,
    H,
    W,
    stride_b,
    stride_c,
    stride_d,
    stride_h,
    stride_w,
    n_dg,
    n_hg,
    n_wg,
    w_d,
    w_h,
    w_w,
    HAS_GRAD: tl.constexpr,
    GROUP_D: tl.constexpr,
    GROUP_H: tl.constexpr,
    GROUP_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    # grid: (B * C * n_dg * n_hg * n_wg,), flattened so that a sample's programs are consecutive.
    # One program: the depth group dg, row group hg and column group wg of plane (b, c); it writes one
    # fp32 partial of the weighted sum and, with HAS_GRAD, the gradient of every voxel it owns.
    pid = tl.program_id(0)
    wg = pid % n_wg
    rest = pid // n_wg
    hg = rest % n_hg
    rest = rest // n_hg
    dg = rest % n_dg
    bc = rest // n_dg
    # Plane bases in int64; offsets inside a plane in int32 unless the launcher says they overflow
    # (WIDE_INDEX): 64-bit offset tensors cost two registers per element and pushed ptxas into spills.
    idx_ty = tl.int64 if WIDE_INDEX else tl.int32
    x_plane = x_ptr + (bc // C).to(tl.int64) * stride_b + (bc % C).to(tl.int64) * stride_c
    g_plane = grad_ptr + bc.to(tl.int64) * D * H * W
    d0 = dg * GROUP_D
    d1 = tl.minimum(d0 + GROUP_D, D)
    h_end = tl.minimum(hg * GROUP_H + GROUP_H, H)
    w_end = tl.minimum(wg * GROUP_W + GROUP_W, W)
    acc = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    for h0 in range(hg * GROUP_H, h_end, BLOCK_H):
        for w0 in range(wg * GROUP_W, w_end, BLOCK_W):
            hh = h0 + tl.arange(0, BLOCK_H)[:, None]
            ww = w0 + tl.arange(0, BLOCK_W)[None, :]
            inside = (hh < H) & (ww < W)
            has_right = inside & (ww + 1 < W)
            has_down = inside & (hh + 1 < H)
            off = hh.to(idx_ty) * stride_h + ww.to(idx_ty) * stride_w
            g_off = hh.to(idx_ty) * W + ww
            x_c = tl.load(x_plane + d0.to(idx_ty) * stride_d + off, mask=inside, other=0.0).to(tl.float32)
            # sign(x[d] - x[d-1]) for the first slice of the group; later slices carry it.
            s_prev = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
            if HAS_GRAD:
                has_up_d = inside & (d0 > 0)
                x_b = tl.load(x_plane + (d0 - 1).to(idx_ty) * stride_d + off, mask=has_up_d, other=0.0)
                back = tl.where(has_up_d, x_c - x_b.to(tl.float32), 0.0)
                s_prev = (back > 0).to(tl.float32) - (back < 0).to(tl.float32)
            for d in range(d0, d1):
                x_slice = x_plane + tl.cast(d, idx_ty) * stride_d
                has_next = inside & (d + 1 < D)
                x_n = tl.load(x_slice + stride_d + off, mask=has_next, other=0.0).to(tl.float32)
                x_r = tl.load(x_slice + off + stride_w, mask=has_right, other=0.0).to(tl.float32)
                x_dn = tl.load(x_slice + off + stride_h, mask=has_down, other=0.0).to(tl.float32)
                diff_d = tl.where(has_next, x_n - x_c, 0.0)
                diff_h = tl.where(has_down, x_dn - x_c, 0.0)
                diff_w = tl.where(has_right, x_r - x_c, 0.0)
                acc += w_d * tl.abs(diff_d) + w_h * tl.abs(diff_h) + w_w * tl.abs(diff_w)
                if HAS_GRAD:
                    has_left = inside & (ww > 0)
                    has_up = inside & (hh > 0)
                    x_l = tl.load(x_slice + off - stride_w, mask=has_left, other=0.0).to(tl.float32)
                    x_u = tl.load(x_slice + off - stride_h, mask=has_up, other=0.0).to(tl.float32)
                    # sign(v) = (v > 0) - (v < 0), written out: the interpreter re-patches its builtins
                    # on every call of a nested jit function, which would dominate its run time.
                    back_h = tl.where(has_up, x_c - x_u, 0.0)
                    back_w = tl.where(has_left, x_c - x_l, 0.0)
                    s_d = (diff_d > 0).to(tl.float32) - (diff_d < 0).to(tl.float32)
                    grad = (
                        w_d * (s_prev - s_d)
                        + w_h * ((back_h > 0).to(tl.float32) - (back_h < 0).to(tl.float32))
                        - w_h * ((diff_h > 0).to(tl.float32) - (diff_h < 0).to(tl.float32))
                        + w_w * ((back_w > 0).to(tl.float32) - (back_w < 0).to(tl.float32))
                        - w_w * ((diff_w > 0).to(tl.float32) - (diff_w < 0).to(tl.float32))
                    )
                    g_ptrs = g_plane + tl.cast(d, idx_ty) * H * W + g_off
                    tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
                    s_prev = s_d
                x_c = x_n
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


def tv_forward(
    x: torch.Tensor, weights: tuple[float, ...], with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums ``(B,)`` fp32 and, with ``with_grad``, the gradient of their sum.

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, D, H, W)``, any strides.
        weights: one factor per spatial axis, in x's axis order.
        with_grad: also write ``d sum_b tv_b / dx`` (contiguous, x's dtype); else an empty tensor.
    """
    if x.ndim == 4:
        B, C, H, W = x.shape
        D, stride_d, (w_h, w_w), w_d = 1, 0, weights, 0.0
        stride_b, stride_c, stride_h, stride_w = x.stride()
    else:
        B, C, D, H, W = x.shape
        w_d, w_h, w_w = weights
        stride_b, stride_c, stride_d, stride_h, stride_w = x.stride()
    n_dg, n_hg, n_wg = triton.cdiv(D, GROUP_D), triton.cdiv(H, GROUP_H), triton.cdiv(W, GROUP_W)
    # Largest offset inside one plane (neighbours included), in elements: int32 indexing unless it overflows.
    plane_extent = max(D * H * W, (D + 1) * stride_d + (H + 1) * stride_h + (W + 1) * stride_w)
    per_sample = C * n_dg * n_hg * n_wg
    partials = torch.empty(B * per_sample, device=x.device, dtype=torch.float32)
    grad = torch.empty(x.shape if with_grad else (0,), device=x.device, dtype=x.dtype)
    if B * per_sample > 0:
        launch(
            tv_forward_kernel,
            (B * per_sample,),
            x,
            grad if with_grad else partials,
            partials,
            C,
            D,
            H,
            W,
            stride_b,
            stride_c,
            stride_d,
            stride_h,
            stride_w,
            n_dg,
            n_hg,
            n_wg,
            float(w_d),
            float(w_h),
            float(w_w),
            HAS_GRAD=with_grad,
            GROUP_D=GROUP_D,
            GROUP_H=GROUP_H,
            GROUP_W=GROUP_W,
            WIDE_INDEX=plane_extent >= 2**31,
        )
    return row_sum(partials.view(B, per_sample)), grad


def tv_backward(grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Scale the gradient stored by :func:`tv_forward` by each sample's upstream gradient ``(B,)``."""
    return scale_saved_grad(grad, grad_out)


def _tv_fake(x: torch.Tensor, weights: list[float], with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    per_sample = x.new_empty(x.shape[0], dtype=torch.float32)
    grad = x.new_empty(x.shape if with_grad else (0,))
    return per_sample, grad


@define_op("invcoss_triton::tv", fake=_tv_fake)
def tv_op(x: torch.Tensor, weights: list[float], with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-sample sums (B,) fp32, gradient or empty)``; see :func:`tv_forward`."""
    return tv_forward(x, tuple(weights), with_grad)


def _tv_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _tv_backward(ctx, grad_sums: torch.Tensor, _grad_of_grad: torch.Tensor | None):
    (grad,) = ctx.saved_tensors
    return tv_backward(grad, grad_sums), None, None


tv_op.register_autograd(_tv_backward, setup_context=_tv_setup_context)


def tv(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Per-sample weighted anisotropic L1 sums ``(B,)`` fp32, differentiable in x (the backend contract)."""
    with_grad = x.requires_grad and torch.is_grad_enabled()
    return tv_op(x, list(weights), with_grad)[0]
