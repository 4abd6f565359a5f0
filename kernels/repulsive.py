"""Repulsive loss (Eq. 5): mean squared cosine between a batch h ``(B, D)`` and a pool ``(P, D)``.

With ``h^ = h / max(|h|, eps)`` (the same for pool rows) and ``c_ij = h^_i . p^_j``:
``L = 1/(B P) sum_ij c_ij^2`` and ``dL/dh_i = 2/(B P |h_i|) (sum_j c_ij p^_j - (sum_j c_ij^2) h^_i)``
(the projection drops out where ``|h_i| <= eps``, whose normalisation is a plain scale). Both paths
write this gradient during the forward pass; backward only scales it by the upstream gradient.

Direct path, two passes and no float atomics. :func:`repulsive_direct_kernel` runs on a grid of
``B`` tiles x ``P`` chunks (enough chunks to fill the SMs twice over): one program computes the raw
dots ``s = h p^T`` of a ``(BLOCK_B, BLOCK_P)`` tile with ``tl.dot`` over D, scales them by both rows'
inverse norms into cosines ``c_ij = s_ij / (|h_i| |p_j|)`` (``(B,)`` and ``(P,)`` vectors, one pass
each per call; ``RepulsivePool`` caches the pool's, so the pool is never copied or renormalised),
adds ``sum_j c_ij^2`` to its row partials and, with a gradient, multiplies the same tile into
``Y_i = sum_j c_ij p^_j`` with a second
``tl.dot`` per ``BLOCK_DO`` columns, accumulated in an fp32 partial buffer ``(chunks, B, D)`` that
the program owns: every cosine is computed once. :func:`repulsive_direct_finish_kernel` adds the
partials of every chunk in a fixed order and writes the per-row losses ``q_i = sum_j c_ij^2`` and
the gradient ``2/(B P |h_i|) (Y_i - q_i h^_i)``.

Precision of the direct path. h and pool both bf16 (or both fp16): both ``tl.dot`` take operands of
that dtype with fp32 accumulation (wgmma on Hopper); the computed fp32 factors ``c_ij / |p_j|`` of
the second product are split into ``hi + lo`` in that dtype and multiplied twice, so they keep about
16 significant bits instead of being truncated (they are at most ``1 / |p_j|``: for fp16 the pool
rows need norms above 2^-16, as RepulsivePool's unit rows have). Other combinations (fp32, mixed
dtypes) upcast to fp32 and use "ieee".

Gram path (:func:`gram_forward_kernel`, :func:`gram_finish_kernel`): ``sum_j c_ij^2 = h^_i^T G h^_i``
with ``G = sum_j p^_j p^_j^T`` ``(D, D)``, so the cost is O(B D^2) whatever P. The first kernel
computes ``T = h G`` tile by tile with per-chunk partials of ``h . T`` and ``|h|^2``; the second adds
the partials in a fixed order and writes the per-row losses and ``2/(B P |h|^2) (T - (h^T G h^) h)``.
:func:`gram_update_kernel` keeps G current with one rank-k product per push or eviction; G's data are
fp32 or fp64, so those dots use "ieee".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from invcoss.kernels.launch import INTERPRET, autotune, config, define_op, launch, scale_saved_grad, sm_count
from invcoss.kernels.reduce import row_sum

GRAM_CHUNK_D = 64  # gradient columns per gram_forward program; fixes the number of partials per row
# Launch parameters of the untuned kernels (kernels/aot.py compiles exactly these).
FINISH_LAUNCH = {"BLOCK_B": 16, "BLOCK_C": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}
DIRECT_FINISH_LAUNCH = {"BLOCK_B": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}
INV_NORM_LAUNCH = {"BLOCK_R": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}

# Hopper tiles of the 16-bit (MMA) variant: BLOCK_B >= 64 rows per warpgroup (num_warps 4 = one
# warpgroup, 8 = two), so both dots qualify for wgmma; BLOCK_DO bounds the gradient tile.
DIRECT_MMA_CONFIGS = [
    config(4, 3, BLOCK_B=64, BLOCK_P=128, BLOCK_K=64, BLOCK_DO=64),
    config(8, 3, BLOCK_B=128, BLOCK_P=128, BLOCK_K=64, BLOCK_DO=64),
    config(4, 4, BLOCK_B=64, BLOCK_P=64, BLOCK_K=64, BLOCK_DO=64),
]
# fp32 "ieee" dots run on the FMA units with their operand tiles in registers: smaller tiles.
DIRECT_FP32_CONFIGS = [
    config(4, 2, BLOCK_B=32, BLOCK_P=32, BLOCK_K=16, BLOCK_DO=64),
    config(4, 2, BLOCK_B=64, BLOCK_P=32, BLOCK_K=16, BLOCK_DO=32),
    config(4, 2, BLOCK_B=32, BLOCK_P=64, BLOCK_K=16, BLOCK_DO=32),
]
DIRECT_INTERPRET_CONFIG = config(4, 1, BLOCK_B=16, BLOCK_P=16, BLOCK_K=16, BLOCK_DO=16)
# Every config's BLOCK_P divides P_ALIGN, so one chunking of the pool serves all of them.
P_ALIGN = (
    DIRECT_INTERPRET_CONFIG.kwargs["BLOCK_P"]
    if INTERPRET
    else max(c.kwargs["BLOCK_P"] for c in DIRECT_MMA_CONFIGS + DIRECT_FP32_CONFIGS)
)
NOMINAL_BLOCK_B = 64  # rows per program assumed when choosing the number of pool chunks
WAVES = 2  # programs per SM the chunking aims for
# With a gradient a chunk writes and the finishing pass reads BLOCK_B x D fp32 partials per
# 4 BLOCK_B x chunk x D flops: chunks of at least 4 * P_ALIGN (512) pool rows keep that traffic
# below the time of the chunk's matmuls.
MIN_GRAD_CHUNK_TILES = 4
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


# The interpreter (Triton 3.8) multiplies bf16 dot operands as raw bits: it gets fp32 copies of them
# (exact: every bf16/fp16 value is an fp32 value), the compiled kernels the 16-bit operands.
DOT_UPCAST = tl.constexpr(INTERPRET)


@triton.jit
def _dot16(a, b, acc):
    """``acc + a @ b`` for 16-bit a and b, with fp32 accumulation."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def inv_norm_kernel(
    x_ptr,  # (R, D) any strides
    out_ptr,  # (R,) fp32: 1 / max(|x_r|, eps)
    R,
    D,
    stride_r,
    stride_d,
    eps,
    ALIGNED: tl.constexpr,  # D and stride_r are multiples of 16: vector loads
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_R),). One program: the inverse norms of BLOCK_R rows.
    if ALIGNED:  # exact for multiples of 16, and shows the compiler that they are
        D = D // 16 * 16
        stride_r = stride_r // 16 * 16
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    ds = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = row_mask[:, None] & (d0 + ds < D)[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_r + (d0 + ds)[None, :] * stride_d
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(tl.sum(acc, axis=1)), eps), mask=row_mask)


@triton.jit
def repulsive_direct_kernel(
    h_ptr,  # (B, D) any strides
    p_ptr,  # (P, D) any strides, rows not necessarily normalised
    hinv_ptr,  # (B,) fp32: 1 / max(|h_i|, eps)
    pinv_ptr,  # (P,) fp32: 1 / max(|p_j|, eps)
    party_ptr,  # (n_chunks, B, D) fp32: Y_i = sum_j c_ij p^_j over the chunk; unused without HAS_GRAD
    partsq_ptr,  # (n_chunks, B) fp32: sum_j c_ij^2 over the chunk
    B,
    P,
    D,
    chunk_len,  # pool rows per chunk, a multiple of BLOCK_P
    stride_hb,
    stride_hd,
    stride_pp,
    stride_pd,
    HAS_GRAD: tl.constexpr,
    MMA: tl.constexpr,  # h and pool share a 16-bit dtype: dots in that dtype
    PRECISION: tl.constexpr,  # input_precision of the fp32 dots (MMA False)
    ALIGNED: tl.constexpr,  # D, the row strides and chunk_len are multiples of 16: vector loads
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B), n_chunks). One program: rows [pid_b * BLOCK_B, +BLOCK_B) of h against
    # pool rows [pid_c * chunk_len, +chunk_len); writes their row partials and, with HAS_GRAD, their
    # (BLOCK_B, D) partial of Y (loaded back and added to for the chunk's later pool tiles).
    if ALIGNED:  # exact for multiples of 16, and shows the compiler that they are
        D = D // 16 * 16
        chunk_len = chunk_len // 16 * 16
        stride_hb = stride_hb // 16 * 16
        stride_pp = stride_pp // 16 * 16
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hb
    y_rows = party_ptr + (pid_c.to(tl.int64) * B + rows.to(tl.int64))[:, None] * D
    ks = tl.arange(0, BLOCK_K)
    p_start = pid_c * chunk_len
    p_end = tl.minimum(p_start + chunk_len, P)
    inv_h = tl.load(hinv_ptr + rows, mask=row_mask, other=0.0)
    row_sq = tl.zeros((BLOCK_B,), tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        prow = p0 + tl.arange(0, BLOCK_P)
        p_mask = prow < p_end
        p_rows = p_ptr + prow.to(tl.int64)[:, None] * stride_pp
        s = tl.zeros((BLOCK_B, BLOCK_P), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_mask = (k0 + ks < D)[None, :]
            hk = tl.load(h_rows + (k0 + ks)[None, :] * stride_hd, mask=row_mask[:, None] & k_mask, other=0.0)
            pk = tl.load(p_rows + (k0 + ks)[None, :] * stride_pd, mask=p_mask[:, None] & k_mask, other=0.0)
            if MMA:
                s = _dot16(hk, tl.trans(pk), s)
            else:
                s = tl.dot(hk.to(tl.float32), tl.trans(pk.to(tl.float32)), s, input_precision=PRECISION)
        inv_p = tl.load(pinv_ptr + prow, mask=p_mask, other=0.0)
        c = s * inv_h[:, None] * inv_p[None, :]  # cosines; padded rows and columns hold 0
        row_sq += tl.sum(c * c, axis=1)
        if HAS_GRAD:
            u = c * inv_p[None, :]  # Y_i = sum_j u_ij p_j with the raw pool rows; |u_ij| <= 1 / |p_j|
            if MMA:
                u_hi = u.to(p_ptr.dtype.element_ty)
                u_lo = (u - u_hi.to(tl.float32)).to(p_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_DO):
                cols = d0 + tl.arange(0, BLOCK_DO)
                col_mask = cols < D
                pd = tl.load(
                    p_rows + cols[None, :] * stride_pd, mask=p_mask[:, None] & col_mask[None, :], other=0.0
                )
                tile_mask = row_mask[:, None] & col_mask[None, :]
                y_ptrs = y_rows + cols[None, :]
                y = tl.load(y_ptrs, mask=tile_mask & (p0 > p_start), other=0.0)  # none for the first tile
                if MMA:
                    y = _dot16(u_hi, pd, y)
                    y = _dot16(u_lo, pd, y)
                else:
                    y = tl.dot(u, pd.to(tl.float32), y, input_precision=PRECISION)
                tl.store(y_ptrs, y, mask=tile_mask)
    tl.store(partsq_ptr + pid_c.to(tl.int64) * B + rows, row_sq, mask=row_mask)


# Two tunings of the same kernel, as the dtypes give it two different hot loops (kernels/aot.py
# compiles each over its own configs). The keys name every argument that changes the compiled
# variant; the tensors' dtypes join them automatically.
DIRECT_KEY = ["D", "HAS_GRAD", "MMA", "PRECISION", "ALIGNED"]
repulsive_direct_mma_kernel = autotune(DIRECT_MMA_CONFIGS, key=DIRECT_KEY, interpret=DIRECT_INTERPRET_CONFIG)(
    repulsive_direct_kernel
)
repulsive_direct_fp32_kernel = autotune(
    DIRECT_FP32_CONFIGS, key=DIRECT_KEY, interpret=DIRECT_INTERPRET_CONFIG
)(repulsive_direct_kernel)
# Launched only through the two tunings, which are what kernels/aot.py lists and compiles.
del repulsive_direct_kernel


@triton.jit
def repulsive_direct_finish_kernel(
    h_ptr,  # (B, D) any strides
    party_ptr,  # (n_chunks, B, D) fp32; unused without HAS_GRAD
    partsq_ptr,  # (n_chunks, B) fp32
    rowloss_ptr,  # (B,) fp32: sum_j c_ij^2
    grad_ptr,  # (B, D) contiguous, h's dtype; unused without HAS_GRAD
    B,
    D,
    stride_hb,
    stride_hd,
    n_chunks,
    eps,
    grad_scale,  # 2 / (B P)
    HAS_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,  # D and stride_hb are multiples of 16: vector loads
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D) with HAS_GRAD else 1). One program: the chunk
    # partials of BLOCK_B rows, added in chunk order; programs with pid_d == 0 store the row losses;
    # with HAS_GRAD, |h|^2 of the rows and gradient columns [pid_d * BLOCK_D, +BLOCK_D) of them.
    if ALIGNED:  # exact for multiples of 16, and shows the compiler that they are
        D = D // 16 * 16
        stride_hb = stride_hb // 16 * 16
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    q = tl.zeros((BLOCK_B,), tl.float32)
    sq_ptrs = partsq_ptr + rows
    for _c in range(0, n_chunks):
        q += tl.load(sq_ptrs, mask=row_mask, other=0.0)
        sq_ptrs += B
    if pid_d == 0:
        tl.store(rowloss_ptr + rows, q, mask=row_mask)
    if HAS_GRAD:
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hb
        ds = tl.arange(0, BLOCK_D)
        h_acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + ds < D)[None, :]
            hd = tl.load(h_rows + (d0 + ds)[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
            h_acc += hd * hd
        h_sq = tl.sum(h_acc, axis=1)
        inv_h = 1.0 / tl.maximum(tl.sqrt(h_sq), eps)
        cols = pid_d * BLOCK_D + ds
        tile_mask = row_mask[:, None] & (cols < D)[None, :]
        dense = rows.to(tl.int64)[:, None] * D + cols[None, :]
        chunk_step = (tl.program_id(0).to(tl.int64) * 0 + B) * D  # B * D in int64
        y_ptrs = party_ptr + dense
        y = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for _c in range(0, n_chunks):
            y += tl.load(y_ptrs, mask=tile_mask, other=0.0)
            y_ptrs += chunk_step
        hd = tl.load(h_rows + cols[None, :] * stride_hd, mask=tile_mask, other=0.0).to(tl.float32)
        proj = tl.where(h_sq > eps * eps, q, 0.0)
        grad = (grad_scale * inv_h)[:, None] * (y - proj[:, None] * (hd * inv_h[:, None]))
        tl.store(grad_ptr + dense, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)


@autotune(GRAM_CONFIGS, key=["D", "HAS_GRAD"], interpret=GRAM_INTERPRET_CONFIG)
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


def pool_chunks(b: int, n_pool: int, with_grad: bool, device: torch.device) -> tuple[int, int]:
    """``(chunk_len, n_chunks)``: how :func:`repulsive_direct_kernel` splits a pool of ``n_pool`` rows.

    Enough chunks that ``cdiv(b, NOMINAL_BLOCK_B) x n_chunks`` programs fill every SM ``WAVES`` times,
    each a multiple of ``P_ALIGN`` rows (every config's BLOCK_P divides it) and, with a gradient, at
    least ``MIN_GRAD_CHUNK_TILES`` of them; no chunk is empty. Depends on the shape and the device
    only, never on the tuned config, so the summation order is fixed for a given device.
    """
    tiles = triton.cdiv(n_pool, P_ALIGN)
    wanted = triton.cdiv(WAVES * sm_count(device), triton.cdiv(b, NOMINAL_BLOCK_B))
    tiles_per_chunk = max(triton.cdiv(tiles, wanted), MIN_GRAD_CHUNK_TILES if with_grad else 1)
    chunk_len = tiles_per_chunk * P_ALIGN
    return chunk_len, triton.cdiv(n_pool, chunk_len)


def row_inv_norms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / max(|x_r|, eps)`` of every row of x ``(R, D)`` as ``(R,)`` fp32 (reads x once, no copy)."""
    r, d = x.shape
    out = torch.empty(r, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(r, INV_NORM_LAUNCH["BLOCK_R"]),)
    aligned = x.stride(1) == 1 and d % 16 == 0 and x.stride(0) % 16 == 0
    launch(
        inv_norm_kernel, grid, x, out, r, d, x.stride(0), x.stride(1), eps, ALIGNED=aligned, **INV_NORM_LAUNCH
    )
    return out


def repulsive_direct_forward(
    h: torch.Tensor,
    pool: torch.Tensor,
    eps: float,
    with_grad: bool,
    pool_inv_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 of h ``(B, D)`` against pool ``(P, D)`` (B, P, D >= 1) as 0-dim fp32, and its gradient
    (contiguous, h's dtype) with ``with_grad``, else an empty tensor. ``pool_inv_norm`` ``(P,)`` fp32,
    the pool rows' ``1 / max(|p_j|, eps)``, is computed here when not given."""
    b, d = h.shape
    n_pool = pool.shape[0]
    hinv = row_inv_norms(h, eps)
    pinv = row_inv_norms(pool, eps) if pool_inv_norm is None else pool_inv_norm.float()
    chunk_len, n_chunks = pool_chunks(b, n_pool, with_grad, h.device)
    part_sq = torch.empty(n_chunks, b, device=h.device, dtype=torch.float32)
    part_y = torch.empty((n_chunks, b, d) if with_grad else (0,), device=h.device, dtype=torch.float32)
    mma = h.dtype == pool.dtype and h.dtype in (torch.float16, torch.bfloat16)
    aligned = (
        h.stride(1) == 1
        and pool.stride(1) == 1
        and all(v % 16 == 0 for v in (d, chunk_len, h.stride(0), pool.stride(0)))
    )
    launch(
        repulsive_direct_mma_kernel if mma else repulsive_direct_fp32_kernel,
        lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), n_chunks),
        h,
        pool,
        hinv,
        pinv,
        part_y if with_grad else part_sq,
        part_sq,
        b,
        n_pool,
        d,
        chunk_len,
        h.stride(0),
        h.stride(1),
        pool.stride(0),
        pool.stride(1),
        HAS_GRAD=with_grad,
        MMA=mma,
        PRECISION="ieee",
        ALIGNED=aligned,
    )
    row_loss = torch.empty(b, device=h.device, dtype=torch.float32)
    grad = torch.empty((b, d) if with_grad else (0,), device=h.device, dtype=h.dtype)
    n_col_blocks = triton.cdiv(d, DIRECT_FINISH_LAUNCH["BLOCK_D"]) if with_grad else 1
    launch(
        repulsive_direct_finish_kernel,
        (triton.cdiv(b, DIRECT_FINISH_LAUNCH["BLOCK_B"]), n_col_blocks),
        h,
        part_y if with_grad else part_sq,
        part_sq,
        row_loss,
        grad if with_grad else row_loss,
        b,
        d,
        h.stride(0),
        h.stride(1),
        n_chunks,
        eps,
        2.0 / (b * n_pool),
        HAS_GRAD=with_grad,
        ALIGNED=h.stride(1) == 1 and d % 16 == 0 and h.stride(0) % 16 == 0,
        **DIRECT_FINISH_LAUNCH,
    )
    return _mean_over_rows(row_loss, n_pool), grad


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
    fake=lambda h, pool, eps, with_grad, pool_inv_norm=None: _fake_loss_and_grad(h, with_grad),
)
def repulsive_direct_op(
    h: torch.Tensor,
    pool: torch.Tensor,
    eps: float,
    with_grad: bool,
    pool_inv_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, gradient or empty)``; see :func:`repulsive_direct_forward`."""
    return repulsive_direct_forward(h, pool, eps, with_grad, pool_inv_norm)


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
    return scale_saved_grad(grad, grad_loss), None, None, None, None


def _gram_backward(ctx, grad_loss: torch.Tensor, _unused: torch.Tensor | None):
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(grad, grad_loss), None, None, None, None


repulsive_direct_op.register_autograd(_direct_backward, setup_context=_save_grad)
repulsive_gram_op.register_autograd(_gram_backward, setup_context=_save_grad)


def _needs_grad(h: torch.Tensor) -> bool:
    return h.requires_grad and torch.is_grad_enabled()


def repulsive_direct(
    h: torch.Tensor, pool: torch.Tensor, eps: float, pool_inv_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 5 of h ``(B, D)`` against pool ``(P >= 1, D)``, differentiable in h (the backend contract)."""
    if h.shape[0] == 0 or h.shape[1] == 0:
        return _degenerate_loss(h)
    return repulsive_direct_op(h, pool.detach(), float(eps), _needs_grad(h), pool_inv_norm)[0]


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
