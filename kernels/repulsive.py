"""Repulsive loss (Eq. 5): mean squared cosine between a batch h ``(B, D)`` and a pool ``(P, D)``.

With ``h^ = h / max(|h|, eps)`` (the same for pool rows) and ``c_ij = h^_i . p^_j``:
``L = 1/(B P) sum_ij c_ij^2`` and ``dL/dh_i = 2/(B P |h_i|) (sum_j c_ij p^_j - (sum_j c_ij^2) h^_i)``
(the projection drops out where ``|h_i| <= eps``, whose normalisation is a plain scale). Both paths
write this gradient during the forward pass; backward only scales it by the upstream gradient.

Direct path (:func:`repulsive_direct_kernel`): each program owns ``BLOCK_B`` rows of h and
``BLOCK_DO`` gradient columns, and loops over pool tiles: ``tl.dot`` over D gives the cosines of a
``(BLOCK_B, BLOCK_P)`` tile, which are squared and summed and multiplied into the gradient
accumulator with a second ``tl.dot``, all in registers. The ``B x P`` matrix never exists in memory;
the price is that each of the ``D / BLOCK_DO`` column programs recomputes the cosines, which is cheap
because the direct path only runs for small pools (``RepulsivePool`` switches to the Gram path when
``P > D``).

Gram path (:func:`gram_forward_kernel`, :func:`gram_finish_kernel`): ``sum_j c_ij^2 = h^_i^T G h^_i``
with ``G = sum_j p^_j p^_j^T`` ``(D, D)``, so the cost is O(B D^2) whatever P. The first kernel
computes ``T = h G`` tile by tile with per-chunk partials of ``h . T`` and ``|h|^2``; the second adds
the partials in a fixed order and writes the per-row losses and ``2/(B P |h|^2) (T - (h^T G h^) h)``.
:func:`gram_update_kernel` keeps G current with one rank-k product per push or eviction.

Precision: every ``tl.dot`` takes fp32 operands with fp32 accumulation. fp16/bf16 inputs are exact in
tf32, so their dot runs on tensor cores; fp32 inputs and G (fp32 data) use "ieee".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from invcoss.kernels.launch import autotune, config, define_op, dot_precision, launch, scale_saved_grad
from invcoss.kernels.reduce import row_sum

GRAM_CHUNK_D = 64  # gradient columns per gram_forward program; fixes the number of partials per row
# Launch parameters of the untuned finishing kernel (kernels/aot.py compiles exactly these).
FINISH_LAUNCH = {"BLOCK_B": 16, "BLOCK_C": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}

# fp32 operands: an "ieee" dot runs on the FMA units with its tiles in registers, so the tiles stay
# small (~200 registers, no spills); bf16/fp16 inputs take the tf32 tensor-core path with the same
# tiles at ~100-130 registers. BLOCK_DO = 64 bounds the gradient accumulator.
DIRECT_CONFIGS = [
    config(4, 2, BLOCK_B=16, BLOCK_P=32, BLOCK_K=16, BLOCK_DO=64),
    config(4, 2, BLOCK_B=32, BLOCK_P=32, BLOCK_K=16, BLOCK_DO=64),
    config(8, 2, BLOCK_B=32, BLOCK_P=32, BLOCK_K=32, BLOCK_DO=64),
    config(8, 2, BLOCK_B=64, BLOCK_P=32, BLOCK_K=16, BLOCK_DO=64),
]
DIRECT_INTERPRET_CONFIG = config(4, 1, BLOCK_B=16, BLOCK_P=16, BLOCK_K=32, BLOCK_DO=32)
GRAM_CONFIGS = [
    config(4, 3, BLOCK_B=32, BLOCK_K=64),
    config(4, 4, BLOCK_B=16, BLOCK_K=64),
    config(8, 3, BLOCK_B=64, BLOCK_K=32),
]
GRAM_INTERPRET_CONFIG = config(4, 1, BLOCK_B=16, BLOCK_K=16)
UPDATE_CONFIGS = [
    config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
]
UPDATE_INTERPRET_CONFIG = config(4, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


@autotune(DIRECT_CONFIGS, key=["D"], interpret=DIRECT_INTERPRET_CONFIG)
@triton.jit
def repulsive_direct_kernel(
    h_ptr,  # (B, D) any strides
    p_ptr,  # (P, D) any strides, rows not necessarily normalised
    grad_ptr,  # (B, D) contiguous, h's dtype; unused without HAS_GRAD
    rowsq_ptr,  # (B,) fp32: sum_j c_ij^2
    B,
    P,
    D,
    stride_hb,
    stride_hd,
    stride_pp,
    stride_pd,
    eps,
    grad_scale,  # 2 / (B P)
    HAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B), cdiv(D, BLOCK_DO) with HAS_GRAD else 1). One program: rows
    # [pid_b * BLOCK_B, +BLOCK_B) of h against the whole pool; column block pid_d of their gradient.
    # Programs with pid_d == 0 store sum_j c_ij^2 of their rows.
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hb
    ks = tl.arange(0, BLOCK_K)
    h_sq = tl.zeros((BLOCK_B,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask = row_mask[:, None] & (k0 + ks < D)[None, :]
        hk = tl.load(h_rows + (k0 + ks)[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        h_sq += tl.sum(hk * hk, axis=1)
    inv_h = 1.0 / tl.maximum(tl.sqrt(h_sq), eps)
    cols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    col_mask = cols < D
    row_sq = tl.zeros((BLOCK_B,), tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        prow = p0 + tl.arange(0, BLOCK_P)
        p_mask = prow < P
        p_rows = p_ptr + prow.to(tl.int64)[:, None] * stride_pp
        dots = tl.zeros((BLOCK_B, BLOCK_P), tl.float32)
        p_sq = tl.zeros((BLOCK_P,), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_mask = (k0 + ks < D)[None, :]
            hk = tl.load(h_rows + (k0 + ks)[None, :] * stride_hd, mask=row_mask[:, None] & k_mask, other=0.0)
            pk = tl.load(p_rows + (k0 + ks)[None, :] * stride_pd, mask=p_mask[:, None] & k_mask, other=0.0)
            pk = pk.to(tl.float32)
            dots = tl.dot(hk.to(tl.float32), tl.trans(pk), dots, input_precision=PRECISION)
            p_sq += tl.sum(pk * pk, axis=1)
        inv_p = 1.0 / tl.maximum(tl.sqrt(p_sq), eps)
        cos = dots * inv_h[:, None] * inv_p[None, :]  # padded rows/columns hold dots = 0
        row_sq += tl.sum(cos * cos, axis=1)
        if HAS_GRAD:
            pd_mask = p_mask[:, None] & col_mask[None, :]
            pd = tl.load(p_rows + cols[None, :] * stride_pd, mask=pd_mask, other=0.0).to(tl.float32)
            acc = tl.dot(cos, pd * inv_p[:, None], acc, input_precision=PRECISION)
    if pid_d == 0:
        tl.store(rowsq_ptr + rows, row_sq, mask=row_mask)
    if HAS_GRAD:
        tile_mask = row_mask[:, None] & col_mask[None, :]
        hd = tl.load(h_rows + cols[None, :] * stride_hd, mask=tile_mask, other=0.0).to(tl.float32)
        proj = tl.where(h_sq > eps * eps, row_sq, 0.0)
        grad = (grad_scale * inv_h)[:, None] * (acc - proj[:, None] * (hd * inv_h[:, None]))
        g_ptrs = grad_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)


@autotune(GRAM_CONFIGS, key=["D"], interpret=GRAM_INTERPRET_CONFIG)
@triton.jit
def gram_forward_kernel(
    h_ptr,  # (B, D) any strides
    g_ptr,  # (D, D) fp32 or fp64, symmetric
    t_ptr,  # (B, D) fp32 scratch: T = h G; unused without HAS_GRAD
    quad_ptr,  # (B, n_chunks) fp32 partials of h . T
    hsq_ptr,  # (B, n_chunks) fp32 partials of |h|^2
    B,
    D,
    stride_hb,
    stride_hd,
    stride_gm,
    stride_gn,
    n_chunks,
    HAS_GRAD: tl.constexpr,
    CHUNK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B), n_chunks = cdiv(D, CHUNK_D)). One program: T[rows, chunk] = h[rows] G[:, chunk]
    # by tl.dot over D, and the partials of h . T and |h|^2 over that chunk.
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    cols = pid_d * CHUNK_D + tl.arange(0, CHUNK_D)
    col_mask = cols < D
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hb
    ks = tl.arange(0, BLOCK_K)
    t = tl.zeros((BLOCK_B, CHUNK_D), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = k0 + ks < D
        hk = tl.load(
            h_rows + (k0 + ks)[None, :] * stride_hd, mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        g_ptrs = g_ptr + (k0 + ks).to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn
        gk = tl.load(g_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        t = tl.dot(hk.to(tl.float32), gk.to(tl.float32), t, input_precision="ieee")
    tile_mask = row_mask[:, None] & col_mask[None, :]
    hd = tl.load(h_rows + cols[None, :] * stride_hd, mask=tile_mask, other=0.0).to(tl.float32)
    part = rows.to(tl.int64) * n_chunks + pid_d
    tl.store(quad_ptr + part, tl.sum(t * hd, axis=1), mask=row_mask)
    tl.store(hsq_ptr + part, tl.sum(hd * hd, axis=1), mask=row_mask)
    if HAS_GRAD:
        tl.store(t_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], t, mask=tile_mask)


@triton.jit
def gram_finish_kernel(
    h_ptr,  # (B, D) any strides
    t_ptr,  # (B, D) fp32 T = h G
    quad_ptr,  # (B, n_chunks) fp32
    hsq_ptr,  # (B, n_chunks) fp32
    rowloss_ptr,  # (B,) fp32: h^_i^T G h^_i
    grad_ptr,  # (B, D) contiguous, h's dtype; unused without HAS_GRAD
    B,
    D,
    stride_hb,
    stride_hd,
    n_chunks,
    eps,
    grad_scale,  # 2 / (B P)
    HAS_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B),). One program: BLOCK_B rows; sums their partials in chunk order, writes
    # h^T G h^ and, with HAS_GRAD, grad_scale / max(|h|, eps)^2 * (T - (h^T G h^) h).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    cs = tl.arange(0, BLOCK_C)
    quad = tl.zeros((BLOCK_B,), tl.float32)
    h_sq = tl.zeros((BLOCK_B,), tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        mask = row_mask[:, None] & (c0 + cs < n_chunks)[None, :]
        part = rows.to(tl.int64)[:, None] * n_chunks + (c0 + cs)[None, :]
        quad += tl.sum(tl.load(quad_ptr + part, mask=mask, other=0.0), axis=1)
        h_sq += tl.sum(tl.load(hsq_ptr + part, mask=mask, other=0.0), axis=1)
    inv_sq = 1.0 / tl.maximum(h_sq, eps * eps)
    quad_hat = quad * inv_sq
    tl.store(rowloss_ptr + rows, quad_hat, mask=row_mask)
    if HAS_GRAD:
        proj = tl.where(h_sq > eps * eps, quad_hat, 0.0)
        coef = grad_scale * inv_sq
        ds = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + ds < D)[None, :]
            hd = tl.load(
                h_ptr + rows.to(tl.int64)[:, None] * stride_hb + (d0 + ds)[None, :] * stride_hd, mask=mask
            )
            dense = rows.to(tl.int64)[:, None] * D + (d0 + ds)[None, :]
            t = tl.load(t_ptr + dense, mask=mask)
            grad = coef[:, None] * (t - proj[:, None] * hd.to(tl.float32))
            tl.store(grad_ptr + dense, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@autotune(UPDATE_CONFIGS, key=["D"], interpret=UPDATE_INTERPRET_CONFIG, restore_value=["gram_ptr"])
@triton.jit
def gram_update_kernel(
    f_ptr,  # (K, D) normalised features, any strides
    gram_ptr,  # (D, D) fp32 or fp64, updated in place
    K,
    D,
    stride_fk,
    stride_fd,
    stride_gm,
    stride_gn,
    alpha,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(D, BLOCK_M), cdiv(D, BLOCK_N)). One program: G[m-block, n-block] += alpha F^T F over
    # all K rows. Tiles are disjoint, so the in-place update needs no atomics (the autotuner restores
    # G between its timing runs: restore_value).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < D
    n_mask = rn < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_rows = f_ptr + (k0 + ks).to(tl.int64)[:, None] * stride_fk
        k_mask = (k0 + ks < K)[:, None]
        a = tl.load(k_rows + rm[None, :] * stride_fd, mask=k_mask & m_mask[None, :], other=0.0)
        b = tl.load(k_rows + rn[None, :] * stride_fd, mask=k_mask & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
    mask = m_mask[:, None] & n_mask[None, :]
    g_ptrs = gram_ptr + rm.to(tl.int64)[:, None] * stride_gm + rn[None, :] * stride_gn
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    tl.store(g_ptrs, g + (alpha * acc).to(g.dtype), mask=mask)


def _mean_over_rows(row_values: torch.Tensor, n_pool: int) -> torch.Tensor:
    """``sum(row_values) / (B P)`` as a 0-dim fp32 tensor, summed in a fixed order."""
    b = row_values.shape[0]
    return row_sum(row_values.view(1, b), 1.0 / (b * n_pool)).view(())


def repulsive_direct_forward(
    h: torch.Tensor, pool: torch.Tensor, eps: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 of h ``(B, D)`` against pool ``(P, D)`` (B, P, D >= 1) as 0-dim fp32, and its gradient
    (contiguous, h's dtype) with ``with_grad``, else an empty tensor."""
    b, d = h.shape
    n_pool = pool.shape[0]
    row_sq = torch.empty(b, device=h.device, dtype=torch.float32)
    grad = torch.empty((b, d) if with_grad else (0,), device=h.device, dtype=h.dtype)
    grid = lambda meta: (
        triton.cdiv(b, meta["BLOCK_B"]),
        triton.cdiv(d, meta["BLOCK_DO"]) if with_grad else 1,
    )
    launch(
        repulsive_direct_kernel,
        grid,
        h,
        pool,
        grad if with_grad else row_sq,
        row_sq,
        b,
        n_pool,
        d,
        h.stride(0),
        h.stride(1),
        pool.stride(0),
        pool.stride(1),
        eps,
        2.0 / (b * n_pool),
        HAS_GRAD=with_grad,
        PRECISION=dot_precision(h.dtype) if pool.dtype == h.dtype else "ieee",
    )
    return _mean_over_rows(row_sq, n_pool), grad


def repulsive_gram_forward(
    h: torch.Tensor, gram: torch.Tensor, count: int, eps: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 through ``G = sum_j p^_j p^_j^T`` of ``count`` pool rows; as :func:`repulsive_direct_forward`."""
    b, d = h.shape
    n_chunks = triton.cdiv(d, GRAM_CHUNK_D)
    quad = torch.empty(b, n_chunks, device=h.device, dtype=torch.float32)
    h_sq = torch.empty(b, n_chunks, device=h.device, dtype=torch.float32)
    t = torch.empty((b, d) if with_grad else (0,), device=h.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), n_chunks)
    launch(
        gram_forward_kernel,
        grid,
        h,
        gram,
        t if with_grad else quad,
        quad,
        h_sq,
        b,
        d,
        h.stride(0),
        h.stride(1),
        gram.stride(0),
        gram.stride(1),
        n_chunks,
        HAS_GRAD=with_grad,
        CHUNK_D=GRAM_CHUNK_D,
    )
    row_loss = torch.empty(b, device=h.device, dtype=torch.float32)
    grad = torch.empty((b, d) if with_grad else (0,), device=h.device, dtype=h.dtype)
    launch(
        gram_finish_kernel,
        (triton.cdiv(b, FINISH_LAUNCH["BLOCK_B"]),),
        h,
        t if with_grad else quad,
        quad,
        h_sq,
        row_loss,
        grad if with_grad else row_loss,
        b,
        d,
        h.stride(0),
        h.stride(1),
        n_chunks,
        eps,
        2.0 / (b * count),
        HAS_GRAD=with_grad,
        **FINISH_LAUNCH,
    )
    return _mean_over_rows(row_loss, count), grad


def gram_update_forward(gram: torch.Tensor, feats: torch.Tensor, alpha: float) -> None:
    """In place ``gram += alpha * feats^T feats`` for feats ``(K, D)``, accumulated in fp32 per tile."""
    k, d = feats.shape
    if k == 0 or d == 0:
        return
    grid = lambda meta: (triton.cdiv(d, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"]))
    launch(
        gram_update_kernel,
        grid,
        feats,
        gram,
        k,
        d,
        feats.stride(0),
        feats.stride(1),
        gram.stride(0),
        gram.stride(1),
        alpha,
    )


# ---- torch.library ops and their autograd formulas ----------------------------------------------


def _fake_loss_and_grad(h: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad = h.new_empty(h.shape if with_grad else (0,))
    return h.new_empty((), dtype=torch.float32), grad


@define_op(
    "invcoss_triton::repulsive_direct",
    fake=lambda h, pool, eps, with_grad: _fake_loss_and_grad(h, with_grad),
)
def repulsive_direct_op(
    h: torch.Tensor, pool: torch.Tensor, eps: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, gradient or empty)``; see :func:`repulsive_direct_forward`."""
    return repulsive_direct_forward(h, pool, eps, with_grad)


@define_op(
    "invcoss_triton::repulsive_gram",
    fake=lambda h, gram, count, eps, with_grad: _fake_loss_and_grad(h, with_grad),
)
def repulsive_gram_op(
    h: torch.Tensor, gram: torch.Tensor, count: int, eps: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, gradient or empty)``; see :func:`repulsive_gram_forward`."""
    return repulsive_gram_forward(h, gram, count, eps, with_grad)


@define_op("invcoss_triton::gram_update", fake=lambda gram, feats, alpha: None, mutates_args=("gram",))
def gram_update_op(gram: torch.Tensor, feats: torch.Tensor, alpha: float) -> None:
    """In place ``gram += alpha * feats^T feats``; see :func:`gram_update_forward`."""
    gram_update_forward(gram, feats, alpha)


def _save_grad(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _direct_backward(ctx, grad_loss: torch.Tensor, _unused: torch.Tensor | None):
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(grad, grad_loss), None, None, None


def _gram_backward(ctx, grad_loss: torch.Tensor, _unused: torch.Tensor | None):
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(grad, grad_loss), None, None, None, None


repulsive_direct_op.register_autograd(_direct_backward, setup_context=_save_grad)
repulsive_gram_op.register_autograd(_gram_backward, setup_context=_save_grad)


def _needs_grad(h: torch.Tensor) -> bool:
    return h.requires_grad and torch.is_grad_enabled()


def repulsive_direct(h: torch.Tensor, pool: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 5 of h ``(B, D)`` against pool ``(P >= 1, D)``, differentiable in h (the backend contract)."""
    if h.shape[0] == 0 or h.shape[1] == 0:
        return _degenerate_loss(h)
    return repulsive_direct_op(h, pool.detach(), float(eps), _needs_grad(h))[0]


def repulsive_gram(h: torch.Tensor, gram: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """Eq. 5 from the pool's Gram matrix ``(D, D)`` of ``count`` rows (the backend contract)."""
    if h.shape[0] == 0 or h.shape[1] == 0:
        return _degenerate_loss(h)
    return repulsive_gram_op(h, gram.detach(), int(count), float(eps), _needs_grad(h))[0]


def gram_update(gram: torch.Tensor, feats_hat: torch.Tensor, alpha: float) -> None:
    """In place ``gram += alpha * feats_hat^T feats_hat`` (the backend contract)."""
    gram_update_op(gram, feats_hat.detach(), float(alpha))


def _degenerate_loss(h: torch.Tensor) -> torch.Tensor:
    # No rows (a mean over nothing: NaN, as the reference) or no feature (all cosines 0: loss 0);
    # kept differentiable so backward gives zeros.
    value = float("nan") if h.shape[0] == 0 else 0.0
    return (h.float().sum() * 0.0) + value
