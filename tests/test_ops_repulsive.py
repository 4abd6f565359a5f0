"""repulsive_cosine_loss (Eq. 5) and RepulsivePool's Gram path on the torch backend."""

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import repulsive_ref, to_np
from tests.ops.tolerances import TOL

SHAPES = [(1, 1, 1), (1, 5, 3), (7, 1, 13), (3, 11, 2), (17, 19, 8)]  # (B, P, D)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("bpd", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_numpy(bpd, dtype, contiguous):
    b, p, d = bpd
    if contiguous:
        h, pool = torch.randn(b, d, dtype=torch.float64), torch.randn(p, d, dtype=torch.float64)
    else:
        h, pool = torch.randn(d, b, dtype=torch.float64).T, torch.randn(d, p, dtype=torch.float64).T
    h, pool = h.to(dtype).requires_grad_(), pool.to(dtype).requires_grad_()
    loss = ops.repulsive_cosine_loss(h, pool, backend="torch")
    ref, grad = repulsive_ref(to_np(h), to_np(pool))
    assert loss.ndim == 0
    np.testing.assert_allclose(loss.item(), ref, **TOL[dtype])
    loss.backward()
    np.testing.assert_allclose(to_np(h.grad), grad, **TOL[dtype])
    assert pool.grad is None  # the pool is a constant


def test_known_value_and_empty_pool():
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    # cos^2 against (1, 0): 1 and 1/2 -> mean 0.75
    assert ops.repulsive_cosine_loss(h, torch.tensor([[2.0, 0.0]]), backend="torch").item() == pytest.approx(
        0.75
    )
    loss = ops.repulsive_cosine_loss(h, torch.zeros(0, 2))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_zero_feature_is_finite():
    h = torch.zeros(2, 3, requires_grad=True)
    loss = ops.repulsive_cosine_loss(h, torch.randn(4, 3), backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()


def test_gradcheck_fp64():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    pool = torch.randn(9, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.repulsive_cosine_loss(t, pool, backend="torch"), (h,))


@pytest.mark.parametrize("capacity, dim", [(50, 8), (37, 5)])
def test_pool_gram_path_equals_direct_after_evictions(capacity, dim):
    pool = ops.RepulsivePool(capacity, dim, rebuild_every=1000, backend="torch")  # no rebuild: pure updates
    kept = []
    for k in [3, 1, 7, 12, 40, 2, 64, 5, 9, 11] * 6:
        feats = torch.randn(k, dim) * torch.rand(k, 1) * 10
        pool.push(feats)
        kept = (kept + list(feats))[-capacity:]
    assert len(pool) == capacity and len(pool) > dim
    kept = torch.stack(kept)
    torch.testing.assert_close(pool.features(), kept / kept.norm(dim=1, keepdim=True), rtol=1e-6, atol=1e-6)
    h = torch.randn(6, dim, requires_grad=True)
    h2 = h.detach().clone().requires_grad_()
    gram_loss = pool.loss(h)  # P > D: the Gram path
    direct = ops.repulsive_cosine_loss(h2, kept, backend="torch")
    torch.testing.assert_close(gram_loss, direct, rtol=1e-5, atol=0)
    gram_loss.backward(), direct.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-8)


def test_pool_small_uses_direct_and_state_dict_roundtrip():
    pool = ops.RepulsivePool(10, 16, backend="torch")
    pool.push(torch.randn(4, 16))
    h = torch.randn(3, 16)
    torch.testing.assert_close(pool.loss(h), ops.repulsive_cosine_loss(h, pool.features(), backend="torch"))
    pool.push(torch.randn(9, 16))
    restored = ops.RepulsivePool(10, 16, backend="torch")
    restored.load_state_dict(pool.state_dict())
    assert len(restored) == 10
    torch.testing.assert_close(restored.loss(h), pool.loss(h))
    torch.testing.assert_close(restored.features(), pool.features())


def test_pool_push_more_than_capacity_keeps_newest():
    pool = ops.RepulsivePool(4, 2, backend="torch")
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    pool.push(feats)
    expected = feats[-4:] / feats[-4:].norm(dim=1, keepdim=True)
    torch.testing.assert_close(pool.features(), expected)
    torch.testing.assert_close(pool.gram, expected.T @ expected)


def test_bad_input():
    with pytest.raises(ValueError, match=r"h of shape \(B, D\), got \(3,\)"):
        ops.repulsive_cosine_loss(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"pool of shape \(P, 3\), got \(2, 4\)"):
        ops.repulsive_cosine_loss(torch.zeros(1, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same device"):
        ops.repulsive_cosine_loss(torch.zeros(1, 3), torch.zeros(2, 3, device="meta"))
    pool = ops.RepulsivePool(4, 3)
    with pytest.raises(ValueError, match=r"h of shape \(B, 3\), got \(2, 5\)"):
        pool.loss(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="capacity"):
        ops.RepulsivePool(0, 3)
