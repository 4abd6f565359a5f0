"""Total variation (Eq. 8): forward reads x once for the per-sample sums; backward recomputes the gradient.

``x`` is ``(B, C, H, W)`` or ``(B, C, D, H, W)``; a 2-D image is a volume of depth 1. The loss is
``sum w_a |x[i+1] - x[i]|`` along every spatial axis ``a``, and its gradient at i is
``w_a (sign(x[i] - x[i-1]) - sign(x[i+1] - x[i]))`` with sign(0) = 0. The forward kernel reads x
once and writes one fp32 partial sum per program; the backward kernel reads x again and writes
``grad_sums[b] * d(sums[b])/dx`` once, in x's dtype. Nothing of x's size is kept between the two
but x itself: a gradient written during the forward pass would cost a full-size buffer, one more
write and one more read (16 B per fp32 value instead of 12; with a separate scaling kernel for
bf16, more). The neighbour loads of a tile hit L1/L2.

Work decomposition. A program owns a fixed work unit, a group of ``GROUP_D x GROUP_H x GROUP_W``
voxels of one ``(b, c)`` plane, and walks it in ``BLOCK_H x BLOCK_W`` tiles (the autotuned part),
stepping through depth with the current slice carried in registers (and, in backward, the previous
slice's difference sign). Because the unit does not depend on the tile config, the partials buffer
and the grid do not either: the autotuner may pick any config without leaving stale partials
behind. The per-sample sums are then reduced in a fixed order by
:func:`invcoss.kernels.reduce.row_sum` (no float atomics: deterministic).

Strides. x is read through its strides, so a non-contiguous x is never copied; the gradient is written
contiguous. Loads coalesce when W is the unit-stride axis (the usual NCHW/NCDHW layout); a
channels-last input is read correctly at lower bandwidth, which still beats a full copy. When W is
the unit-stride axis and every other stride and W are multiples of 16 bytes' worth of values
(``ALIGNED``), the kernels tell the compiler so, and (x being 16-byte aligned) the loads of the centre, the
row below and the slices before and behind become 16-byte vector loads (``ld.global.v4``); the
left/right neighbours are shifted by one value and stay scalar (they come from L1).

Double backward: ``tv_backward`` is differentiable too, with a zero derivative in x (the gradient
is piecewise constant, as that of ``torch.abs``) and the exact one in the incoming gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl
from invcoss.kernels.launch import autotune, config, define_op, launch
from invcoss.kernels.reduce import row_sum

# The work unit of one program (see the module doc); every BLOCK_* of the configs divides it.
GROUP_D, GROUP_H, GROUP_W = 4, 32, 256

# Memory-bound stencil on Hopper: four voxels per thread and per load. In backward each voxel keeps
# its centre, six neighbours and the carried depth sign live across the depth loop; at eight voxels
# per thread ptxas needs 106-149 registers in the aligned variants and up to 210 (Triton 3.6) or a
# spill in the unaligned and int64-index ones; at four, 56-108 (ahead-of-time table, kernels/aot.py).
# Forward needs fewer.
TV_CONFIGS = [
    config(4, 2, BLOCK_H=4, BLOCK_W=128),
    config(4, 2, BLOCK_H=8, BLOCK_W=64),
    config(4, 2, BLOCK_H=2, BLOCK_W=256),
    # Eight values per thread: 16-byte loads for bf16/fp16 (two for fp32).
    config(2, 2, BLOCK_H=4, BLOCK_W=128),
    config(4, 2, BLOCK_H=8, BLOCK_W=128),
]
TV_INTERPRET_CONFIG = config(4, 1, BLOCK_H=16, BLOCK_W=64)


def values_per_thread(cfg: triton.Config) -> int:
    """Values of a tile row a thread loads per step: 8 or more give 16-byte loads of bf16/fp16."""
    return cfg.kwargs["BLOCK_H"] * cfg.kwargs["BLOCK_W"] // (cfg.num_warps * 32)


def variant_configs(
    configs: list[triton.Config], element_size: int, flags: Mapping[str, object]
) -> list[triton.Config]:
    """The configs worth compiling for one variant of the TV kernels; never prunes to nothing.

    ``element_size`` is x's, ``flags`` the launch's constexprs (``ALIGNED``, ``WIDE_INDEX``):

    - Aligned 16-bit x: only eight values per thread (16-byte loads; four load 8 bytes at a time).
    - Unaligned x (scalar loads whatever the tile) and int64 offsets: only four values per thread.
      Eight buy no wider load there and cost registers: 210 in the unaligned backward and a spill in
      the int64 forward with Triton 3.6.
    - Aligned 32-bit x with int32 offsets: every config.

    The autotuner prunes with it at launch (:func:`prune_for_variant`) and the ahead-of-time table
    compiles the same subset (the kernels' ``variant_configs``), so the design guards check exactly
    what can run.
    """
    wide = [c for c in configs if values_per_thread(c) >= 8]
    narrow = [c for c in configs if values_per_thread(c) < 8]
    if not flags.get("ALIGNED", True) or flags.get("WIDE_INDEX", False):
        return narrow or configs
    if element_size == 2:
        return wide or configs
    return configs


def prune_for_variant(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """``early_config_prune`` of both kernels: :func:`variant_configs` for this launch's x and flags."""
    x = named_args.get("x_ptr")
    if x is None:
        return configs
    return variant_configs(configs, x.element_size(), kwargs)


# Keys: the shape and every constexpr the launcher chooses (the autotuner adds the dtypes of the
# tensor arguments to the key itself).
TV_KEY = ["D", "H", "W", "ALIGNED", "WIDE_INDEX"]


@triton.jit
def _plane_offsets(
    pid,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_d,
    stride_h,
    n_dg,
    n_hg,
    n_wg,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # The program's (b * C + c, depth group, row group, column group) and the plane's offset in x.
    wg = pid % n_wg
    rest = pid // n_wg
    hg = rest % n_hg
    rest = rest // n_hg
    dg = rest % n_dg
    bc = rest // n_dg
    if ALIGNED:
        # Exact here, and the compiler's alignment analysis sees the factor VEC (tl.multiple_of on
        # an argument of a jit function called by the kernel does not reach the kernel).
        stride_b = stride_b // VEC * VEC
        stride_c = stride_c // VEC * VEC
        stride_d = stride_d // VEC * VEC
        stride_h = stride_h // VEC * VEC
        W = W // VEC * VEC
    x_off = (bc // C).to(tl.int64) * stride_b + (bc % C).to(tl.int64) * stride_c
    return bc, dg, hg, wg, x_off, stride_d, stride_h, W


@autotune(
    TV_CONFIGS,
    key=TV_KEY,
    interpret=TV_INTERPRET_CONFIG,
    prune_configs_by={"early_config_prune": prune_for_variant},
)
@triton.jit
def tv_forward_kernel(
    x_ptr,  # (B, C, D, H, W) any strides
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
    GROUP_D: tl.constexpr,
    GROUP_H: tl.constexpr,
    GROUP_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    # grid: (B * C * n_dg * n_hg * n_wg,), flattened so that a sample's programs are consecutive.
    # One program: the depth group dg, row group hg and column group wg of plane (b, c); it writes one
    # fp32 partial of the weighted sum of the forward differences of the voxels it owns.
    pid = tl.program_id(0)
    bc, dg, hg, wg, x_off, stride_d, stride_h, W = _plane_offsets(
        pid, C, H, W, stride_b, stride_c, stride_d, stride_h, n_dg, n_hg, n_wg, VEC, ALIGNED
    )
    # Plane bases in int64; offsets inside a plane in int32 unless the launcher says they overflow
    # (WIDE_INDEX): 64-bit offset tensors cost two registers per element and pushed ptxas into spills.
    idx_ty = tl.int64 if WIDE_INDEX else tl.int32
    x_plane = x_ptr + x_off
    d0 = dg * GROUP_D
    d1 = tl.minimum(d0 + GROUP_D, D)
    h_end = tl.minimum(hg * GROUP_H + GROUP_H, H)
    w_end = tl.minimum(wg * GROUP_W + GROUP_W, W)
    acc = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    for h0 in range(hg * GROUP_H, h_end, BLOCK_H):
        for w0 in range(wg * GROUP_W, w_end, BLOCK_W):
            hh = h0 + tl.arange(0, BLOCK_H)[:, None]
            ww = tl.multiple_of(w0, BLOCK_W) + tl.arange(0, BLOCK_W)[None, :]
            inside = (hh < H) & (ww < W)
            has_right = inside & (ww + 1 < W)
            has_down = inside & (hh + 1 < H)
            off = hh.to(idx_ty) * stride_h + ww.to(idx_ty) * stride_w
            x_c = tl.load(x_plane + d0.to(idx_ty) * stride_d + off, mask=inside, other=0.0).to(tl.float32)
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
                x_c = x_n
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@autotune(
    TV_CONFIGS,
    key=TV_KEY,
    interpret=TV_INTERPRET_CONFIG,
    prune_configs_by={"early_config_prune": prune_for_variant},
)
@triton.jit
def tv_backward_kernel(
    x_ptr,  # (B, C, D, H, W) any strides
    scale_ptr,  # (B,) fp32: the incoming gradient of the per-sample sums
    grad_ptr,  # (B, C, D, H, W) contiguous, x's dtype
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
    GROUP_D: tl.constexpr,
    GROUP_H: tl.constexpr,
    GROUP_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    # grid: as tv_forward_kernel. One program writes scale[b] * d(sums[b])/dx for the voxels of its
    # work unit, in x's dtype, once.
    pid = tl.program_id(0)
    bc, dg, hg, wg, x_off, stride_d, stride_h, W = _plane_offsets(
        pid, C, H, W, stride_b, stride_c, stride_d, stride_h, n_dg, n_hg, n_wg, VEC, ALIGNED
    )
    idx_ty = tl.int64 if WIDE_INDEX else tl.int32
    x_plane = x_ptr + x_off
    g_plane = grad_ptr + bc.to(tl.int64) * D * H * W
    scale = tl.load(scale_ptr + bc // C)
    sw = scale * w_w
    sh = scale * w_h
    sd = scale * w_d
    d0 = dg * GROUP_D
    d1 = tl.minimum(d0 + GROUP_D, D)
    h_end = tl.minimum(hg * GROUP_H + GROUP_H, H)
    w_end = tl.minimum(wg * GROUP_W + GROUP_W, W)
    for h0 in range(hg * GROUP_H, h_end, BLOCK_H):
        for w0 in range(wg * GROUP_W, w_end, BLOCK_W):
            hh = h0 + tl.arange(0, BLOCK_H)[:, None]
            ww = tl.multiple_of(w0, BLOCK_W) + tl.arange(0, BLOCK_W)[None, :]
            inside = (hh < H) & (ww < W)
            has_right = inside & (ww + 1 < W)
            has_down = inside & (hh + 1 < H)
            has_left = inside & (ww > 0)
            has_up = inside & (hh > 0)
            off = hh.to(idx_ty) * stride_h + ww.to(idx_ty) * stride_w
            g_off = hh.to(idx_ty) * W + ww
            x_c = tl.load(x_plane + d0.to(idx_ty) * stride_d + off, mask=inside, other=0.0).to(tl.float32)
            # sign(x[d] - x[d-1]) for the first slice of the group; later slices carry it.
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
                x_l = tl.load(x_slice + off - stride_w, mask=has_left, other=0.0).to(tl.float32)
                x_u = tl.load(x_slice + off - stride_h, mask=has_up, other=0.0).to(tl.float32)
                diff_d = tl.where(has_next, x_n - x_c, 0.0)
                diff_h = tl.where(has_down, x_dn - x_c, 0.0)
                diff_w = tl.where(has_right, x_r - x_c, 0.0)
                back_h = tl.where(has_up, x_c - x_u, 0.0)
                back_w = tl.where(has_left, x_c - x_l, 0.0)
                # sign(v) = (v > 0) - (v < 0), written out: the interpreter re-patches its builtins
                # on every call of a nested jit function, which would dominate its run time.
                s_d = (diff_d > 0).to(tl.float32) - (diff_d < 0).to(tl.float32)
                grad = (
                    sd * (s_prev - s_d)
                    + sh * ((back_h > 0).to(tl.float32) - (back_h < 0).to(tl.float32))
                    - sh * ((diff_h > 0).to(tl.float32) - (diff_h < 0).to(tl.float32))
                    + sw * ((back_w > 0).to(tl.float32) - (back_w < 0).to(tl.float32))
                    - sw * ((diff_w > 0).to(tl.float32) - (diff_w < 0).to(tl.float32))
                )
                g_ptrs = g_plane + tl.cast(d, idx_ty) * H * W + g_off
                tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
                s_prev = s_d
                x_c = x_n


# What the ahead-of-time table compiles per variant (kernels/aot.py): the autotuner's own subset.
tv_forward_kernel.variant_configs = variant_configs
tv_backward_kernel.variant_configs = variant_configs


def _launch_args(x: torch.Tensor, weights: tuple[float, ...]) -> tuple[tuple, dict, int, int]:
    """``(runtime args, constexprs, B, programs per sample)`` of both kernels for x."""
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
    vec = max(1, 16 // x.element_size())
    # The base pointer's alignment is not part of it: the JIT specialises pointers on 16-byte
    # alignment itself, and without it the loads stay scalar.
    aligned = stride_w == 1 and all(s % vec == 0 for s in (stride_b, stride_c, stride_d, stride_h, W))
    args = (C, D, H, W, stride_b, stride_c, stride_d, stride_h, stride_w, n_dg, n_hg, n_wg)
    args += (float(w_d), float(w_h), float(w_w))
    meta = {
        "GROUP_D": GROUP_D,
        "GROUP_H": GROUP_H,
        "GROUP_W": GROUP_W,
        "VEC": vec,
        "ALIGNED": aligned,
        "WIDE_INDEX": plane_extent >= 2**31,
    }
    return args, meta, B, C * n_dg * n_hg * n_wg


def tv_forward(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Per-sample sums ``(B,)`` fp32 of x ``(B, C, H, W)`` or ``(B, C, D, H, W)``, any strides.

    ``weights``: one factor per spatial axis, in x's axis order.
    """
    args, meta, B, per_sample = _launch_args(x, weights)
    partials = torch.empty(B * per_sample, device=x.device, dtype=torch.float32)
    if B * per_sample > 0:
        launch(tv_forward_kernel, (B * per_sample,), x, partials, *args, **meta)
    return row_sum(partials.view(B, per_sample))


def tv_backward(x: torch.Tensor, weights: tuple[float, ...], grad_sums: torch.Tensor) -> torch.Tensor:
    """``grad_sums[b] * d(sums[b])/dx``: x's shape and dtype, contiguous; ``grad_sums`` ``(B,)``."""
    args, meta, B, per_sample = _launch_args(x, weights)
    grad = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    scale = grad_sums.to(torch.float32).contiguous()
    if B * per_sample > 0:
        launch(tv_backward_kernel, (B * per_sample,), x, scale, grad, *args, **meta)
    return grad


def _tv_fake(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    return x.new_empty(x.shape[0], dtype=torch.float32)


def _tv_backward_fake(x: torch.Tensor, weights: list[float], grad_sums: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@define_op("invcoss_triton::tv", fake=_tv_fake)
def tv_op(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Per-sample sums ``(B,)`` fp32; see :func:`tv_forward`."""
    return tv_forward(x, tuple(weights))


@define_op("invcoss_triton::tv_backward", fake=_tv_backward_fake)
def tv_backward_op(x: torch.Tensor, weights: list[float], grad_sums: torch.Tensor) -> torch.Tensor:
    """The backward of ``tv``; see :func:`tv_backward`."""
    return tv_backward(x, tuple(weights), grad_sums)


def _tv_setup_context(ctx, inputs, output) -> None:
    x, weights = inputs
    ctx.weights = list(weights)
    ctx.save_for_backward(x)


def _tv_backward(ctx, grad_sums: torch.Tensor):
    (x,) = ctx.saved_tensors
    return tv_backward_op(x, ctx.weights, grad_sums), None


def _tv_backward_setup_context(ctx, inputs, output) -> None:
    x, weights, grad_sums = inputs
    ctx.weights, ctx.scale_dtype = list(weights), grad_sums.dtype
    ctx.save_for_backward(x)


def _tv_backward_backward(ctx, grad_grad: torch.Tensor):
    # The gradient is piecewise constant in x (zero second derivative, as torch.abs has) and linear
    # in grad_sums: d<grad_grad, grad>/d grad_sums[b] = <grad_grad[b], d(sums[b])/dx[b]>.
    (x,) = ctx.saved_tensors
    unit = tv_backward_op(x, ctx.weights, x.new_ones(x.shape[0], dtype=torch.float32))
    d_scale = (grad_grad.float() * unit.float()).flatten(1).sum(1)
    return None, None, d_scale.to(ctx.scale_dtype)


tv_op.register_autograd(_tv_backward, setup_context=_tv_setup_context)
tv_backward_op.register_autograd(_tv_backward_backward, setup_context=_tv_backward_setup_context)


def tv(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Per-sample weighted anisotropic L1 sums ``(B,)`` fp32, differentiable in x (the backend contract)."""
    return tv_op(x, list(weights))
