"""Column statistics of ``(N, F)`` (Eq. 9) and the stat-matching loss (Eq. 3), Welford/Chan style.

Stage 1 (:func:`welford_partial_kernel`) reads the batch once: each program owns ``BLOCK_F`` columns
of one split of rows and walks it in ``(BLOCK_N, BLOCK_F)`` tiles. A tile's mean and sum of squared
deviations come exactly from registers (the tile is read once, so the "two passes" cost no memory
traffic), and tiles are folded together with Chan et al.'s merge, so a column with a large mean and a
small spread keeps its variance (no sum of squares). The data are shifted by their first row
(``x - x[0]``, exact for values within a factor 2 of it), so even the differences of tile means that
Chan's merge squares stay small, well-resolved numbers in fp32. Each split writes ``(mean, m2)``;
the split of rows is fixed by the launcher, not by the tile config, so the autotuner cannot leave
stale partials.

Stage 2 (:func:`welford_merge_kernel`) merges the splits in a fixed order (deterministic, no
atomics) and finishes one of three ways (``MODE``): the fp32 mean and biased variance; a new running
state ``(mean, m2)`` merged with the stored one (fp32 or fp64 state, accumulated in the state dtype
from the first load on); or the differences to target statistics with per-program squared norms,
which :func:`stat_norms_kernel` turns into the loss ``|dm| + |dv|`` and the inverse norms.

Backward (:func:`batch_mean_var_backward_kernel`) is one elementwise pass for both differentiable ops:
``dx = (c_m g_m + 2 c_v g_v (x - mean)) / N``: ``g_m, g_v`` the upstream gradients of mean and var
(``c = 1``), or for stat matching ``g = (dm, dv)`` and ``c = g_loss / (|dm|, |dv|)`` (0 for a zero norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from invcoss.kernels.launch import autotune, config, define_op, launch, sm_count

MODE_MEAN_VAR, MODE_UPDATE, MODE_STAT_MATCH = 0, 1, 2
# Untuned kernels and their launch parameters (kernels/aot.py compiles exactly these). Stage 2 is tiny
# (n_splits x F loads); one fixed block keeps the number of squared-norm partials fixed.
MERGE_LAUNCH = {"BLOCK_F": 256, "num_warps": 4, "num_stages": 1}
NORMS_LAUNCH = {"BLOCK": 256, "num_warps": 4, "num_stages": 1}
MIN_ROWS_PER_SPLIT = 64

# Column reduction of row-major data: wide BLOCK_F keeps loads coalesced along F; BLOCK_N rows in
# flight per tile hide HBM latency on Hopper.
PARTIAL_CONFIGS = [
    config(4, 2, BLOCK_N=32, BLOCK_F=128),
    config(4, 2, BLOCK_N=16, BLOCK_F=256),
    config(8, 2, BLOCK_N=64, BLOCK_F=128),
]
PARTIAL_INTERPRET_CONFIG = config(4, 1, BLOCK_N=16, BLOCK_F=32)
BACKWARD_CONFIGS = [
    config(4, 2, BLOCK_N=16, BLOCK_F=256),
    config(8, 2, BLOCK_N=32, BLOCK_F=256),
    config(4, 2, BLOCK_N=32, BLOCK_F=128),
]
BACKWARD_INTERPRET_CONFIG = config(4, 1, BLOCK_N=16, BLOCK_F=32)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan et al.: fold (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a); n_a = 0 returns side b.
    frac = n_b / (n_a + n_b)
    delta = mean_b - mean_a
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


# Keys: F, and (added by launch.autotune and by Triton) the free constexpr ALIGNED and the dtype of
# every tensor argument (x's dtype, the accumulation dtype).
@autotune(PARTIAL_CONFIGS, key=["F"], interpret=PARTIAL_INTERPRET_CONFIG)
@triton.jit
def welford_partial_kernel(
    x_ptr,  # (N, F) any strides
    mean_ptr,  # (n_splits, F) accumulation dtype (fp32, or fp64 for an fp64 state)
    m2_ptr,  # (n_splits, F)
    N,
    F,
    stride_n,
    stride_f,
    rows_per_split,
    ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # grid: (cdiv(F, BLOCK_F), n_splits). One program: mean and m2 of BLOCK_F columns over rows
    # [split * rows_per_split, min(N, (split + 1) * rows_per_split)), Chan-merged tile by tile.
    # A tile of BLOCK_N rows is loaded at once (several rows in flight per thread), and its mean
    # costs one reciprocal per tile, not a division per element.
    if ALIGNED:
        # See aligned_rows(): every row starts on 16 elements and F is a multiple of 16, so the
        # loads along F are 16-byte vectors (the JIT specialises on such values by itself; stated
        # here so that the ahead-of-time compile shows it too). Identities when ALIGNED holds,
        # written as arithmetic because tl.multiple_of on a scalar argument does not reach the masks.
        stride_n = (stride_n // 16) * 16
        F = (F // 16) * 16
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_ty = mean_ptr.dtype.element_ty
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    r0 = pid_s * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, N)
    # Shifted data: accumulate x - x[0] so that tile means and their differences stay small numbers
    # (x - x[0] is exact while the two are within a factor 2); stage 2 adds the shift back.
    shift = tl.load(x_ptr + cols.to(tl.int64) * stride_f, mask=col_mask, other=0.0).to(acc_ty)
    mean = tl.zeros((BLOCK_F,), acc_ty)
    m2 = tl.zeros((BLOCK_F,), acc_ty)
    for r in range(r0, r1, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        mask = (rows < r1)[:, None] & col_mask[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_f
        x = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(acc_ty) - shift[None, :], 0.0)
        n_b = tl.cast(tl.minimum(r1 - r, BLOCK_N), acc_ty)
        mean_b = tl.sum(x, axis=0) * (1.0 / n_b)
        dev = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(dev * dev, axis=0)
        mean, m2 = _chan_merge(tl.cast(r - r0, acc_ty), mean, m2, n_b, mean_b, m2_b)
    out = tl.cast(pid_s, tl.int64) * F + cols
    tl.store(mean_ptr + out, mean, mask=col_mask)
    tl.store(m2_ptr + out, m2, mask=col_mask)


@triton.jit
def welford_merge_kernel(
    x_ptr,  # (N, F): its first row is the shift of the stage-1 partials
    stride_f,
    pmean_ptr,  # (n_splits, F) stage-1 partials, relative to the shift
    pm2_ptr,
    n_splits,
    rows_per_split,
    N,
    F,
    count,  # MODE_UPDATE: samples already in the running state
    aux_a_ptr,  # MODE_UPDATE: state mean (F,); MODE_STAT_MATCH: target mean (F,)
    aux_b_ptr,  # MODE_UPDATE: state m2 (F,);   MODE_STAT_MATCH: target var (F,)
    out_a_ptr,  # mean / new state mean / batch mean
    out_b_ptr,  # var / new state m2 / mean - target mean
    out_c_ptr,  # MODE_STAT_MATCH: var - target var
    sq_ptr,  # MODE_STAT_MATCH: (2, n_programs) fp32 squared norms of the two differences
    MODE: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # grid: (cdiv(F, BLOCK_F),). One program merges the splits of BLOCK_F columns in split order and
    # writes the MODE's outputs for those columns.
    pid = tl.program_id(0)
    acc_ty = pmean_ptr.dtype.element_ty
    cols = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    mean = tl.zeros((BLOCK_F,), acc_ty)
    m2 = tl.zeros((BLOCK_F,), acc_ty)
    for s in range(0, n_splits):
        n_a = tl.cast(s, tl.int64) * rows_per_split
        n_b = tl.minimum(rows_per_split, N - n_a)
        off = tl.cast(s, tl.int64) * F + cols
        mean_s = tl.load(pmean_ptr + off, mask=col_mask, other=0.0)
        m2_s = tl.load(pm2_ptr + off, mask=col_mask, other=0.0)
        mean, m2 = _chan_merge(tl.cast(n_a, acc_ty), mean, m2, tl.cast(n_b, acc_ty), mean_s, m2_s)
    n_batch = tl.cast(N, acc_ty)
    shift = tl.load(x_ptr + cols.to(tl.int64) * stride_f, mask=col_mask, other=0.0).to(acc_ty)
    if MODE == 0:
        tl.store(out_a_ptr + cols, (mean + shift).to(tl.float32), mask=col_mask)
        tl.store(out_b_ptr + cols, (m2 / n_batch).to(tl.float32), mask=col_mask)
    elif MODE == 1:
        # Merge in shifted coordinates too: state mean - shift is exact when they are close.
        state_mean = tl.load(aux_a_ptr + cols, mask=col_mask, other=0.0).to(acc_ty) - shift
        state_m2 = tl.load(aux_b_ptr + cols, mask=col_mask, other=0.0).to(acc_ty)
        new_mean, new_m2 = _chan_merge(tl.cast(count, acc_ty), state_mean, state_m2, n_batch, mean, m2)
        tl.store(out_a_ptr + cols, (new_mean + shift).to(out_a_ptr.dtype.element_ty), mask=col_mask)
        tl.store(out_b_ptr + cols, new_m2.to(out_b_ptr.dtype.element_ty), mask=col_mask)
    else:
        target_mean = tl.load(aux_a_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        target_var = tl.load(aux_b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        batch_mean = (mean + shift).to(tl.float32)
        diff_m = tl.where(col_mask, batch_mean - target_mean, 0.0)
        diff_v = tl.where(col_mask, (m2 / n_batch).to(tl.float32) - target_var, 0.0)
        tl.store(out_a_ptr + cols, batch_mean, mask=col_mask)
        tl.store(out_b_ptr + cols, diff_m, mask=col_mask)
        tl.store(out_c_ptr + cols, diff_v, mask=col_mask)
        n_prog = tl.num_programs(0)
        tl.store(sq_ptr + pid, tl.sum(diff_m * diff_m, axis=0))
        tl.store(sq_ptr + n_prog + pid, tl.sum(diff_v * diff_v, axis=0))


@triton.jit
def stat_norms_kernel(
    sq_ptr,  # (2, n_parts) fp32 squared-norm partials
    n_parts,
    loss_ptr,  # () fp32: |dm| + |dv|
    inv_ptr,  # (2,) fp32: 1/|dm|, 1/|dv|, 0 where the norm is 0
    BLOCK: tl.constexpr,
):
    # grid: (1,). Sums both rows of partials in a fixed order and finishes the loss.
    offs = tl.arange(0, BLOCK)
    acc_m = tl.zeros((BLOCK,), tl.float32)
    acc_v = tl.zeros((BLOCK,), tl.float32)
    for p0 in range(0, n_parts, BLOCK):
        mask = p0 + offs < n_parts
        acc_m += tl.load(sq_ptr + p0 + offs, mask=mask, other=0.0)
        acc_v += tl.load(sq_ptr + n_parts + p0 + offs, mask=mask, other=0.0)
    sq_m = tl.sum(acc_m, axis=0)
    sq_v = tl.sum(acc_v, axis=0)
    norm_m = tl.sqrt(sq_m)
    norm_v = tl.sqrt(sq_v)
    tl.store(loss_ptr, norm_m + norm_v)
    tl.store(inv_ptr, tl.where(sq_m > 0, 1.0 / tl.where(sq_m > 0, norm_m, 1.0), 0.0))
    tl.store(inv_ptr + 1, tl.where(sq_v > 0, 1.0 / tl.where(sq_v > 0, norm_v, 1.0), 0.0))


@autotune(BACKWARD_CONFIGS, key=["F"], interpret=BACKWARD_INTERPRET_CONFIG)
@triton.jit
def batch_mean_var_backward_kernel(
    x_ptr,  # (N, F) any strides
    mean_ptr,  # (F,) fp32 batch mean
    gm_ptr,  # (F,) gradient of the mean (or mean - target)
    gv_ptr,  # (F,) gradient of the variance (or var - target)
    coef_ptr,  # (2,) fp32 factors c_m, c_v
    grad_ptr,  # (N, F) contiguous, x's dtype
    N,
    F,
    stride_n,
    stride_f,
    ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), cdiv(F, BLOCK_F)). One program: dx of one (BLOCK_N, BLOCK_F) tile.
    if ALIGNED:  # 16-byte vectors along F for x and grad, as in welford_partial_kernel
        stride_n = (stride_n // 16) * 16
        F = (F // 16) * 16
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    mask = (rows < N)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_n + cols.to(tl.int64)[None, :] * stride_f, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    c_m = tl.load(coef_ptr)
    c_v = tl.load(coef_ptr + 1)
    g_m = tl.load(gm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * c_m
    g_v = tl.load(gv_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * (2.0 * c_v)
    inv_n = 1.0 / tl.cast(N, tl.float32)
    grad = (g_m[None, :] + g_v[None, :] * (x.to(tl.float32) - mean[None, :])) * inv_n
    tl.store(grad_ptr + rows64 * F + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


def aligned_rows(x: torch.Tensor) -> bool:
    """Whether every row of x ``(N, F)`` starts 16 elements from its storage's start (so 16-byte
    aligned: CUDA allocations are) with unit column stride and F a multiple of 16: the kernels'
    ``ALIGNED`` variant, vector loads along F.

    Read from the storage offset, not the data pointer, so that it holds in a trace (fake and
    functional tensors have no pointer). Triton itself checks the pointer's 16-byte alignment at
    launch: a storage that is not aligned (``torch.from_blob``) still gets a correct kernel, with
    narrower loads."""
    f = x.shape[1]
    return x.stride(1) == 1 and f % 16 == 0 and x.stride(0) % 16 == 0 and x.storage_offset() % 16 == 0


def _split_rows(n: int, f: int, device: torch.device) -> tuple[int, int]:
    """``(n_splits, rows_per_split)``: enough programs to fill the GPU, at least 64 rows each."""
    target_programs = 4 * sm_count(device)
    n_splits = max(
        1, min(triton.cdiv(target_programs, triton.cdiv(f, 128)), triton.cdiv(n, MIN_ROWS_PER_SPLIT))
    )
    rows = triton.cdiv(n, n_splits)
    return triton.cdiv(n, rows), rows


def welford_forward(
    x: torch.Tensor,
    mode: int,
    count: int = 0,
    aux_a: torch.Tensor | None = None,
    aux_b: torch.Tensor | None = None,
    acc: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Both stages over x ``(N, F)`` (N >= 1) for one ``mode``; returns that mode's outputs.

    ``MODE_MEAN_VAR`` -> ``(mean, var)`` fp32; ``MODE_UPDATE`` -> ``(mean, m2)`` of the running state
    ``(count, aux_a, aux_b)`` after folding x in, in ``acc`` (the state dtype); ``MODE_STAT_MATCH`` ->
    ``(loss, batch mean, mean - aux_a, var - aux_b, inverse norms (2,))``.
    """
    n, f = x.shape
    if f == 0:
        return _empty_columns(x, mode, acc)
    n_splits, rows = _split_rows(n, f, x.device)
    pmean = torch.empty(n_splits, f, device=x.device, dtype=acc)
    pm2 = torch.empty(n_splits, f, device=x.device, dtype=acc)
    grid = lambda meta: (triton.cdiv(f, meta["BLOCK_F"]), n_splits)
    launch(
        welford_partial_kernel,
        grid,
        x,
        pmean,
        pm2,
        n,
        f,
        x.stride(0),
        x.stride(1),
        rows,
        ALIGNED=aligned_rows(x),
    )

    n_prog = triton.cdiv(f, MERGE_LAUNCH["BLOCK_F"])
    out_dtype = acc if mode == MODE_UPDATE else torch.float32
    out_a = torch.empty(f, device=x.device, dtype=out_dtype)
    out_b = torch.empty(f, device=x.device, dtype=out_dtype)
    # Pointers a mode does not use get a live tensor: the launcher rejects null pointers.
    out_c, sq = out_a, out_b
    if mode == MODE_STAT_MATCH:
        out_c = torch.empty(f, device=x.device, dtype=torch.float32)
        sq = torch.empty(2, n_prog, device=x.device, dtype=torch.float32)
    aux_a = out_a if aux_a is None else aux_a
    aux_b = out_b if aux_b is None else aux_b
    launch(
        welford_merge_kernel,
        (n_prog,),
        x,
        x.stride(1),
        pmean,
        pm2,
        n_splits,
        rows,
        n,
        f,
        count,
        aux_a,
        aux_b,
        out_a,
        out_b,
        out_c,
        sq,
        MODE=mode,
        **MERGE_LAUNCH,
    )
    if mode != MODE_STAT_MATCH:
        return out_a, out_b
    loss = torch.empty((), device=x.device, dtype=torch.float32)
    inv = torch.empty(2, device=x.device, dtype=torch.float32)
    launch(stat_norms_kernel, (1,), sq, n_prog, loss, inv, **NORMS_LAUNCH)
    return loss, out_a, out_b, out_c, inv


def _empty_columns(x: torch.Tensor, mode: int, acc: torch.dtype) -> tuple[torch.Tensor, ...]:
    # F = 0: no column to reduce (no launch over an empty grid); the loss of nothing is 0.
    vec = lambda dtype: torch.empty(0, device=x.device, dtype=dtype)
    if mode == MODE_MEAN_VAR:
        return vec(torch.float32), vec(torch.float32)
    if mode == MODE_UPDATE:
        return vec(acc), vec(acc)
    zeros = lambda *shape: torch.zeros(shape, device=x.device, dtype=torch.float32)
    return zeros(), vec(torch.float32), vec(torch.float32), vec(torch.float32), zeros(2)


def batch_mean_var_backward(
    x: torch.Tensor, mean: torch.Tensor, g_m: torch.Tensor, g_v: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """``dx = (c_m g_m + 2 c_v g_v (x - mean)) / N`` for x ``(N, F)``; contiguous, x's dtype."""
    n, f = x.shape
    grad = torch.empty(n, f, device=x.device, dtype=x.dtype)
    if grad.numel() == 0:
        return grad
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(f, meta["BLOCK_F"]))
    launch(
        batch_mean_var_backward_kernel,
        grid,
        x,
        mean,
        g_m,
        g_v,
        coef,
        grad,
        n,
        f,
        x.stride(0),
        x.stride(1),
        ALIGNED=aligned_rows(x),
    )
    return grad


# ---- torch.library ops and their autograd formulas ----------------------------------------------


def _fake_col_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = x.shape[1]
    return x.new_empty(f, dtype=torch.float32), x.new_empty(f, dtype=torch.float32)


@define_op("invcoss_triton::batch_mean_var", fake=_fake_col_vectors)
def batch_mean_var_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and biased variance of x ``(N, F)``, fp32."""
    return welford_forward(x, MODE_MEAN_VAR)


def _fake_backward(x, mean, g_m, g_v, coef):
    return x.new_empty(x.shape)


@define_op("invcoss_triton::batch_mean_var_backward", fake=_fake_backward)
def batch_mean_var_backward_op(
    x: torch.Tensor, mean: torch.Tensor, g_m: torch.Tensor, g_v: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """The shared backward pass of batch_mean_var and stat_matching; see :func:`batch_mean_var_backward`."""
    return batch_mean_var_backward(x, mean, g_m, g_v, coef)


def _mean_var_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[0])


def _mean_var_backward(ctx, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None):
    x, mean = ctx.saved_tensors
    # Upstream gradients may be expanded views (stride 0); the kernel reads them as dense vectors.
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.contiguous()
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.contiguous()
    coef = torch.ones(2, device=x.device, dtype=torch.float32)
    return batch_mean_var_backward_op(x, mean, grad_mean, grad_var, coef)


batch_mean_var_op.register_autograd(_mean_var_backward, setup_context=_mean_var_setup_context)


def _fake_update(x, count, mean, m2):
    return torch.empty_like(mean), torch.empty_like(m2)


@define_op("invcoss_triton::welford_update", fake=_fake_update)
def welford_update_op(
    x: torch.Tensor, count: int, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold x ``(N, F)`` into the running ``(count, mean, m2)``; new state tensors in mean's dtype."""
    return welford_forward(x, MODE_UPDATE, count, mean, m2, acc=mean.dtype)


def _fake_stat_matching(x, mean, var):
    f = x.shape[1]
    vec = lambda: x.new_empty(f, dtype=torch.float32)
    return x.new_empty((), dtype=torch.float32), vec(), vec(), vec(), x.new_empty(2, dtype=torch.float32)


@define_op("invcoss_triton::stat_matching", fake=_fake_stat_matching)
def stat_matching_op(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, batch mean, mean - target, var - target, inverse norms)``; see :func:`welford_forward`."""
    return welford_forward(x, MODE_STAT_MATCH, 0, mean, var)


def _stat_matching_setup_context(ctx, inputs, output) -> None:
    _, batch_mean, diff_m, diff_v, inv = output
    ctx.save_for_backward(inputs[0], batch_mean, diff_m, diff_v, inv)
    ctx.mark_non_differentiable(batch_mean, diff_m, diff_v, inv)


def _stat_matching_backward(ctx, grad_loss: torch.Tensor, *_unused: torch.Tensor | None):
    x, batch_mean, diff_m, diff_v, inv = ctx.saved_tensors
    return batch_mean_var_backward_op(x, batch_mean, diff_m, diff_v, inv * grad_loss), None, None


stat_matching_op.register_autograd(_stat_matching_backward, setup_context=_stat_matching_setup_context)


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and biased variance of x ``(N, F)`` in fp32, differentiable (the backend contract)."""
    return batch_mean_var_op(x)


def welford_update(
    x: torch.Tensor, count: int, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan merge of x ``(N, F)`` into ``(count, mean, m2)`` (the backend contract); no autograd."""
    return welford_update_op(x.detach(), int(count), mean.contiguous(), m2.contiguous())


def stat_matching(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``|mean_N(x) - mean| + |var_N(x) - var|`` as 0-dim fp32, differentiable in x (the contract)."""
    # The targets are F-vectors read densely by the kernel: a strided view is made dense (cheap).
    return stat_matching_op(x, mean.detach().contiguous(), var.detach().contiguous())[0]
