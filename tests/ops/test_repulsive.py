"""repulsive_cosine_loss (Eq. 5) and RepulsivePool on every backend against float64 numpy (SPEC 2.3).

Known values, shapes (one row, pools longer than a matmul tile), every dtype and memory layout
forward and backward, zero rows and the empty pool, the Gram path against the direct one after
evictions (with and without rebuilds), the rank-k Gram updates, state dicts, determinism,
gradcheck in fp64, the kernels' argument checks and registration (opcheck).
"""

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import repulsive_ref, to_np
from tests.ops.backends import (
    DEVICE,
    EXT,
    FP64_BACKENDS,
    KERNEL_BACKENDS,
    ON_CUDA,
    backend_dtypes,
    backend_module,
    make,
    opcheck,
    opcheck_cases,
    shape_layouts,
    sizes,
)
from tests.ops.tolerances import assert_matches, plain_repulsive, plain_with_grad

# (B, P, D): one of each; more columns than a tile; a pool of two matmul tiles, the second partial.
SHAPES = sizes(
    [(1, 1, 1), (1, 5, 3), (7, 1, 13), (3, 11, 2), (5, 7, 37), (17, 19, 8), (3, 40, 20), (4, 2500, 6)],
    [(33, 70, 64), (7, 9000, 33), (320, 4099, 768)],
)
DTYPE_SHAPES = shape_layouts([(5, 7, 37), (17, 19, 8)], [(320, 4099, 768)])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_scale(h: torch.Tensor, pool: torch.Tensor, eps: float = 1e-8) -> float:
    """The size of the gradient before its projection off h: 2 (C P^) / (B P |h|), largest row.

    The projection cancels most of it, so the gradient's rounding errors scale with this.
    """
    hn, pn = to_np(h), to_np(pool)
    nh = np.maximum(np.linalg.norm(hn, axis=1, keepdims=True), eps)
    pp = pn / np.maximum(np.linalg.norm(pn, axis=1, keepdims=True), eps)
    g_hat = 2.0 * ((hn / nh) @ pp.T @ pp) / (hn.shape[0] * pn.shape[0])
    return float(np.abs(g_hat / nh).max())


@pytest.mark.device
@pytest.mark.parametrize("bpd", SHAPES, ids=str)
def test_repulsive_matches_reference(backend, bpd):
    b, p, d = bpd
    h = make((b, d)).requires_grad_()
    pool = make((p, d), scale=3.0).requires_grad_()
    loss = ops.repulsive_cosine_loss(h, pool, backend=backend)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool))
    assert_matches(loss, ref_loss, torch.float32, b * p * d)
    loss.backward()
    assert_matches(h.grad, ref_grad, torch.float32, b * p * d, scale=_grad_scale(h, pool))
    assert pool.grad is None  # the pool is a constant
    with torch.no_grad():  # the loss-only path (no gradient computed), with a zero row
        h0 = h.detach().clone()
        h0[0] = 0.0
        fwd_only = ops.repulsive_cosine_loss(h0, pool, backend=backend)
    assert_matches(fwd_only, repulsive_ref(to_np(h0), to_np(pool))[0], torch.float32, b * p * d)


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(), indirect=["backend"])
@pytest.mark.parametrize("bpd, layout", DTYPE_SHAPES)
def test_repulsive_dtypes_and_layouts(backend, dtype, bpd, layout):
    b, p, d = bpd
    h = make((b, d), dtype, layout).requires_grad_()
    pool = make((p, d), dtype, layout, scale=3.0)
    loss = ops.repulsive_cosine_loss(h, pool, backend=backend)
    assert loss.dtype == _acc(dtype)
    loss.backward()
    assert h.grad.dtype == dtype
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool))
    plain, plain_grad = plain_with_grad(plain_repulsive, h, pool)
    assert_matches(loss, ref_loss, dtype, b * p * d, plain=plain)
    scale = _grad_scale(h, pool)
    assert_matches(h.grad, ref_grad, dtype, b * p * d, plain=plain_grad, backend=backend, scale=scale)
    with torch.no_grad():  # the loss-only path
        assert_matches(
            ops.repulsive_cosine_loss(h, pool, backend=backend), ref_loss, dtype, b * p * d, plain=plain
        )


@pytest.mark.device
def test_repulsive_known_value(backend):
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0]], device=DEVICE)
    # cos^2 against (1, 0): 1 and 1/2 -> mean 0.75
    loss = ops.repulsive_cosine_loss(h, torch.tensor([[2.0, 0.0]], device=DEVICE), backend=backend)
    assert_matches(loss, 0.75, torch.float32)


@pytest.mark.device
def test_repulsive_zero_rows_strided_and_empty_pool(backend):
    h = make((4, 46))[:, ::2].clone()
    h[2] = 0.0  # |h| < eps: the normalisation is a plain scale, no projection
    h = torch.cat([h, h], 1)[:, ::2].requires_grad_()  # (4, 23), column stride 2
    pool = make((23, 9)).T  # (9, 23), transposed
    loss = ops.repulsive_cosine_loss(h, pool, backend=backend)
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool))
    assert_matches(loss, ref_loss, torch.float32)
    assert_matches(grad, ref_grad, torch.float32, scale=_grad_scale(h, pool))
    assert torch.isfinite(grad).all() and torch.equal(grad[2], torch.zeros_like(grad[2]))
    zeros = torch.zeros(2, 23, device=DEVICE, requires_grad=True)  # every row zero: loss 0, finite
    loss0 = ops.repulsive_cosine_loss(zeros, pool, backend=backend)
    (g0,) = torch.autograd.grad(loss0, zeros)
    assert loss0.item() == 0.0 and torch.isfinite(g0).all()
    empty = ops.repulsive_cosine_loss(h, torch.zeros(0, 23, device=DEVICE), backend=backend)
    (g_empty,) = torch.autograd.grad(empty, h)  # P = 0: the first batch has no pool yet
    assert empty.item() == 0.0 and empty.dtype == torch.float32
    assert torch.equal(g_empty, torch.zeros_like(h))


@pytest.mark.device
def test_repulsive_deterministic(backend):
    b, p, d = (320, 4099, 768) if ON_CUDA else (5, 40, 20)
    h, pool = make((b, d)).requires_grad_(), make((p, d))
    first = ops.repulsive_cosine_loss(h, pool, backend=backend)
    (g1,) = torch.autograd.grad(first, h)
    second = ops.repulsive_cosine_loss(h, pool, backend=backend)
    (g2,) = torch.autograd.grad(second, h)
    assert torch.equal(first, second) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", FP64_BACKENDS, indirect=True)
def test_repulsive_gradcheck_fp64(backend):
    h = make((4, 6), torch.float64).requires_grad_()
    pool = make((9, 6), torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.repulsive_cosine_loss(t, pool, backend=backend), (h,))
    p_hat = torch.nn.functional.normalize(pool, dim=1)
    gram = p_hat.T @ p_hat
    fn = backend_module(backend).repulsive_gram  # the Gram path of RepulsivePool.loss
    assert torch.autograd.gradcheck(lambda t: fn(t, gram, 9, 1e-8), (h,))


@pytest.mark.parametrize(
    "h, pool, match",
    [
        (torch.zeros(3), torch.zeros(2, 3), r"h of shape \(B, D\), got \(3,\)"),
        (torch.zeros(1, 3), torch.zeros(2, 4), r"pool of shape \(P, 3\), got \(2, 4\)"),
        (torch.zeros(1, 3), torch.zeros(2, 3, device="meta"), "same device"),
    ],
    ids=["h-rank", "pool-shape", "device"],
)
def test_repulsive_bad_input(backend, h, pool, match):
    with pytest.raises(ValueError, match=match):
        ops.repulsive_cosine_loss(h, pool, backend=backend)


# ---- RepulsivePool -----------------------------------------------------------------------------------


@pytest.mark.device
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_gram_update(backend, gram_dtype):
    gram = make((21, 21), gram_dtype)
    feats = torch.nn.functional.normalize(make((37, 21)), dim=1)
    expected = to_np(gram)
    for alpha in (1.0, -1.0):
        backend_module(backend).gram_update(gram, feats, alpha)
        expected = expected + alpha * to_np(feats).T @ to_np(feats)
        assert gram.dtype == gram_dtype
        assert_matches(gram, expected, torch.float32)  # the features are fp32


# (capacity, dim, rebuild_every): pure rank-k updates, or rebuilt every few pushes.
POOLS = sizes([(50, 8, 1000), (37, 5, 1000), (30, 12, 3)], [(3000, 256, 16)])


@pytest.mark.device
@pytest.mark.parametrize("capacity, dim, rebuild_every", POOLS, ids=str)
def test_pool_gram_path_equals_direct_after_evictions(backend, capacity, dim, rebuild_every):
    pool = ops.RepulsivePool(capacity, dim, device=DEVICE, rebuild_every=rebuild_every, backend=backend)
    pushes = [500, 1200, 64, 2000, 900] if capacity > 1000 else [3, 1, 7, 12, 40, 2, 64, 5, 9, 11] * 6
    kept = []
    for k in pushes:  # grows past D, wraps the ring buffer, pushes more than its capacity at once
        feats = make((k, dim)) * torch.rand(k, 1, device=DEVICE) * 10
        pool.push(feats)
        kept = (kept + list(feats))[-capacity:]
    assert len(pool) == capacity > dim
    kept = torch.stack(kept)
    kept_hat = to_np(kept) / np.linalg.norm(to_np(kept), axis=1, keepdims=True)
    assert_matches(pool.features(), kept_hat, torch.float32)
    assert_matches(pool.gram, kept_hat.T @ kept_hat, torch.float32)
    h = make((64, dim)).requires_grad_()
    loss = pool.loss(h)  # P > D: the Gram path
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(kept))  # SPEC 2.3: both paths agree
    work = h.shape[0] * capacity * dim  # what the direct path reduces
    assert_matches(loss, ref_loss, torch.float32, work)
    assert_matches(grad, ref_grad, torch.float32, work, scale=_grad_scale(h, kept))
    again = pool.loss(h)
    (grad_again,) = torch.autograd.grad(again, h)
    assert torch.equal(loss, again) and torch.equal(grad, grad_again)


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(), indirect=["backend"])
def test_repulsive_gram_and_direct_agree(backend, dtype):
    impl = backend_module(backend)
    h = make((5, 8), dtype).requires_grad_()
    pool_hat = torch.nn.functional.normalize(make((19, 8), _acc(dtype)), dim=1)
    gram = torch.zeros(8, 8, dtype=torch.float64, device=DEVICE)
    impl.gram_update(gram, pool_hat, 1.0)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool_hat))
    plain, plain_grad = plain_with_grad(plain_repulsive, h, pool_hat)
    for loss in (impl.repulsive_gram(h, gram, 19, 1e-8), impl.repulsive_direct(h, pool_hat, 1e-8)):
        (grad,) = torch.autograd.grad(loss, h)
        assert_matches(loss, ref_loss, dtype, plain=plain)
        assert_matches(
            grad, ref_grad, dtype, plain=plain_grad, backend=backend, scale=_grad_scale(h, pool_hat)
        )


@pytest.mark.device
def test_pool_small_uses_direct_and_state_dict_roundtrip(backend):
    pool = ops.RepulsivePool(10, 16, device=DEVICE, backend=backend)
    pool.push(make((4, 16)))
    h = make((3, 16))
    assert_matches(pool.loss(h), repulsive_ref(to_np(h), to_np(pool.features()))[0], torch.float32)
    pool.push(make((9, 16)))
    restored = ops.RepulsivePool(10, 16, device=DEVICE, backend=backend)
    restored.load_state_dict(pool.state_dict())
    assert len(restored) == 10
    assert torch.equal(restored.features(), pool.features())
    assert_matches(restored.loss(h), to_np(pool.loss(h)), torch.float32)  # G rebuilt on load


@pytest.mark.device
def test_pool_push_more_than_capacity_keeps_newest(backend):
    pool = ops.RepulsivePool(4, 2, device=DEVICE, backend=backend)
    feats = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [5.0, 5.0]], device=DEVICE
    )
    pool.push(feats)
    expected = to_np(feats[-4:]) / np.linalg.norm(to_np(feats[-4:]), axis=1, keepdims=True)
    assert_matches(pool.features(), expected, torch.float32)
    assert_matches(pool.gram, expected.T @ expected, torch.float32)


def test_pool_bad_input(backend):
    pool = ops.RepulsivePool(4, 3, backend=backend)
    with pytest.raises(ValueError, match=r"h of shape \(B, 3\), got \(2, 5\)"):
        pool.loss(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="capacity"):
        ops.RepulsivePool(0, 3, backend=backend)


# ---- 16-bit pools and the split over the pool ------------------------------------------------------

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.device
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_pool_low_precision_push_evict_state_dict(backend, dtype):
    pool = ops.RepulsivePool(24, 16, device=DEVICE, backend=backend, dtype=dtype, rebuild_every=1000)
    kept = []
    for k in (5, 9, 14, 3):  # wraps the ring once, evicting
        feats = make((k, 16)) * 4
        pool.push(feats)
        kept = (kept + list(feats))[-24:]
    kept = torch.stack(kept)
    kept_hat = to_np(kept) / np.linalg.norm(to_np(kept), axis=1, keepdims=True)
    assert pool.features().dtype == dtype and len(pool) == 24
    assert_matches(pool.features(), kept_hat, dtype, plain=torch.from_numpy(kept_hat).to(dtype))
    stored = pool.features().double()
    unit = to_np(stored / stored.norm(dim=1, keepdim=True))  # the rows both paths use
    assert_matches(pool.gram, unit.T @ unit, torch.float32)  # G of the stored rows, kept in fp32
    h = make((6, 16), dtype).requires_grad_()
    loss = pool.loss(h)  # P = 24 > D: the Gram path
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(stored))
    plain, plain_grad = plain_with_grad(plain_repulsive, h, pool.features())
    assert_matches(loss, ref_loss, dtype, plain=plain)
    assert_matches(grad, ref_grad, dtype, plain=plain_grad, backend=backend, scale=_grad_scale(h, stored))
    restored = ops.RepulsivePool(24, 16, device=DEVICE, backend=backend, dtype=dtype)
    restored.load_state_dict(pool.state_dict())
    assert torch.equal(restored.features(), pool.features())
    assert_matches(restored.loss(h), to_np(loss), torch.float32)  # G rebuilt on load
    from_fp32 = ops.RepulsivePool(24, 16, device=DEVICE, backend=backend)  # an fp32 pool's state
    from_fp32.push(kept)
    restored.load_state_dict(from_fp32.state_dict())
    assert restored.features().dtype == dtype
    assert torch.equal(restored.features(), from_fp32.features().to(dtype))


@pytest.mark.device
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_pool_low_precision_direct_path(backend, dtype):
    pool = ops.RepulsivePool(40, 48, device=DEVICE, backend=backend, dtype=dtype)
    pool.push(make((37, 48), scale=2.0))
    stored = pool.features()
    for h in (make((9, 48), dtype), make((48, 9), dtype).T):  # contiguous and column-strided
        h.requires_grad_()
        loss = pool.loss(h)  # P = 37 <= D: the direct path, on the stored rows in place
        (grad,) = torch.autograd.grad(loss, h)
        ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(stored))
        plain, plain_grad = plain_with_grad(plain_repulsive, h, stored)
        assert_matches(loss, ref_loss, dtype, plain=plain)
        scale = _grad_scale(h, stored)
        assert_matches(grad, ref_grad, dtype, plain=plain_grad, backend=backend, scale=scale)
        # the same rows as an fp32 pool: the reference the 16-bit pool must stay close to
        full = ops.RepulsivePool(40, 48, device=DEVICE, backend=backend)
        full.push(stored.float())
        assert_matches(loss, to_np(full.loss(h.detach().float())), dtype, plain=plain)


def test_pool_dtype_checked():
    with pytest.raises(
        ValueError, match=r"dtype torch.float32, torch.bfloat16 or torch.float16, got torch.int8"
    ):
        ops.RepulsivePool(4, 3, dtype=torch.int8)


@pytest.mark.device
def test_pool_direct_path_reads_stored_rows_in_place(backend, monkeypatch):
    pool = ops.RepulsivePool(16, 32, device=DEVICE, backend=backend, dtype=torch.bfloat16)
    pool.push(make((11, 32)))
    impl = backend_module(backend)
    seen = []
    inner = impl.repulsive_direct

    def spy(h, p, eps, pool_inv_norm=None):
        seen.append((p.data_ptr(), None if pool_inv_norm is None else pool_inv_norm.data_ptr()))
        return inner(h, p, eps, pool_inv_norm)

    monkeypatch.setattr(impl, "repulsive_direct", spy)
    h = make((5, 32), torch.bfloat16)
    expected = repulsive_ref(to_np(h), to_np(pool.features()))[0]
    assert_matches(pool.loss(h), expected, torch.bfloat16, plain=plain_repulsive(h, pool.features()))
    # the backend gets the stored rows and their cached inverse norms: no copy, no renormalisation
    assert seen == [(pool.feats.data_ptr(), pool.inv_norms.data_ptr())]


@pytest.mark.device
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_direct_pool_is_not_copied(backend, monkeypatch):
    from invcoss.kernels import repulsive as kr

    pool = ops.RepulsivePool(64, 40, device=DEVICE, backend=backend, dtype=torch.bfloat16)
    pool.push(make((33, 40)))
    launched = []
    inner = kr.launch

    def spy(kernel, grid, *args, **kwargs):
        launched.append((kernel, args))
        inner(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kr, "launch", spy)
    h = make((3, 40), torch.bfloat16)
    pool.loss(h)
    # one pass of inverse norms, over h only: the pool's cached ones are used
    assert [a[0].data_ptr() for k, a in launched if k is kr.inv_norm_kernel] == [h.data_ptr()]
    (args,) = [a for k, a in launched if k is kr.repulsive_direct_mma_kernel]
    assert args[1].data_ptr() == pool.feats.data_ptr() and args[3].data_ptr() == pool.inv_norms.data_ptr()


@pytest.mark.device
@pytest.mark.parametrize("backend", [EXT], indirect=True)
def test_ext_direct_pool_is_not_copied(backend):
    # The extension reads a pool of its operand dtype in place: fp32 on CPU (MKL), bf16 for bf16 h on
    # CUDA (cuBLAS in bf16). A call then allocates far less than one copy of the pool (the reference,
    # which renormalises the pool, allocates more than that).
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    pool = ops.RepulsivePool(256, 256, device=DEVICE, backend=backend, dtype=dtype)
    pool.push(make((200, 256)))
    pool_bytes = pool.features().nbytes
    h = make((2, 256), dtype).requires_grad_()

    def allocated(fn) -> int:
        fn()  # warm
        if ON_CUDA:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)

    reference = backend_module("torch").repulsive_direct
    assert allocated(lambda: reference(h, pool.features(), 1e-8)) > pool_bytes  # the yardstick sees a copy
    assert allocated(lambda: pool.loss(h)) < pool_bytes / 4
    expected = repulsive_ref(to_np(h), to_np(pool.features()))[0]
    assert_matches(pool.loss(h), expected, dtype, plain=plain_repulsive(h, pool.features()))


# (B, P, D): P many times the tile (the interpreter's tile is 16 rows), P = 1, primes, B = 1.
SPLIT_SHAPES = sizes([(3, 700, 20), (7, 131, 13), (1, 257, 9), (5, 1, 8), (1, 1, 3)], [(129, 40_000, 96)])


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bpd", SPLIT_SHAPES, ids=str)
def test_repulsive_split_over_pool(backend, bpd, dtype):
    b, p, d = bpd
    h = make((b, d), dtype).requires_grad_()
    pool = make((p, d), dtype, scale=2.0)
    loss = ops.repulsive_cosine_loss(h, pool, backend=backend)
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool))
    plain, plain_grad = plain_with_grad(plain_repulsive, h, pool)
    assert_matches(loss, ref_loss, dtype, b * p * d, plain=plain)
    scale = _grad_scale(h, pool)
    assert_matches(grad, ref_grad, dtype, b * p * d, plain=plain_grad, backend=backend, scale=scale)
    with torch.no_grad():
        assert_matches(
            ops.repulsive_cosine_loss(h, pool, backend=backend), ref_loss, dtype, b * p * d, plain=plain
        )


@pytest.mark.parametrize("bpd", [(3, 700, 20), (320, 16384, 768), (1, 257, 9), (5, 1, 8)], ids=str)
@pytest.mark.parametrize("with_grad", [False, True])
def test_triton_pool_chunks_cover_the_pool(bpd, with_grad):
    from invcoss.kernels import repulsive as kr
    from invcoss.kernels.launch import HOPPER_SMS

    b, p, _ = bpd
    chunk_len, n_chunks = kr.pool_chunks(b, p, with_grad, torch.device("cpu"))
    assert chunk_len % kr.P_ALIGN == 0
    assert (n_chunks - 1) * chunk_len < p <= n_chunks * chunk_len  # no chunk empty, none missing
    if with_grad:
        assert chunk_len >= kr.MIN_GRAD_CHUNK_TILES * kr.P_ALIGN
    row_blocks, tiles = -(-b // kr.NOMINAL_BLOCK_B), -(-p // kr.P_ALIGN)
    min_tiles = kr.MIN_GRAD_CHUNK_TILES if with_grad else 1
    # at least a program per SM, unless the pool is too short to split that far
    assert row_blocks * n_chunks >= min(HOPPER_SMS, row_blocks * (tiles // min_tiles)) or n_chunks == 1


# ---- the kernels behind the public ops -------------------------------------------------------------


@pytest.mark.device
@pytest.mark.parametrize("backend", [EXT], indirect=True)
@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: torch.ops.invcoss.repulsive_direct(make((3, 4)), make((0, 4)), 1e-8, False),
            r"expected pool of shape \(P, 4\) with P >= 1",
        ),
        (
            lambda: torch.ops.invcoss.repulsive_gram(make((3, 4)), make((4, 5)), 3, 1e-8, False),
            r"expected gram of shape \(4, 4\)",
        ),
        (
            lambda: torch.ops.invcoss.repulsive_direct(make((3, 4)), make((5, 4)), 1e-8, False, make((4,))),
            r"expected pool_inv_norm of shape \(5,\)",
        ),
    ],
    ids=["pool", "gram", "pool_inv_norm"],
)
def test_repulsive_kernel_argument_checks(backend, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


OPCHECK_CASES = [
    (b, name, args)
    for b in KERNEL_BACKENDS
    for name, args in (
        ("repulsive_direct", lambda: (make((3, 5)).requires_grad_(), make((4, 5)), 1e-8, True)),
        (
            "repulsive_direct",
            lambda: (make((3, 5)).requires_grad_(), make((4, 5)), 1e-8, True, make((4,)).abs() + 0.5),
        ),
        (
            "repulsive_gram",
            lambda: (make((3, 5)).requires_grad_(), torch.eye(5, device=DEVICE), 5, 1e-8, True),
        ),
        ("gram_update", lambda: (torch.zeros(5, 5, device=DEVICE), make((3, 5)), 1.0)),
    )
]


@opcheck_cases(OPCHECK_CASES)
def test_repulsive_opcheck(backend, name, args):
    opcheck(backend, name, args())
