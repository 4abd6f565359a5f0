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
    ],
    ids=["pool", "gram"],
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
            "repulsive_gram",
            lambda: (make((3, 5)).requires_grad_(), torch.eye(5, device=DEVICE), 5, 1e-8, True),
        ),
        ("gram_update", lambda: (torch.zeros(5, 5, device=DEVICE), make((3, 5)), 1.0)),
    )
]


@opcheck_cases(OPCHECK_CASES)
def test_repulsive_opcheck(backend, name, args):
    opcheck(backend, name, args())
