"""batch_mean_var, RunningStats (Eq. 9) and stat_matching_loss (Eq. 3) on the torch backend."""

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import mean_var_ref, stat_matching_ref, to_np
from tests.ops.tolerances import TOL

SHAPES = [(1, 1), (1, 7), (2, 3), (13, 1), (5, 3, 11), (4, 17, 2, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _noncontig(shape, dtype):
    # Features last-but-one transposed: same values, strided memory.
    x = torch.randn(*shape[:-1], shape[-1] + 3, dtype=torch.float64)[..., : shape[-1]]
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_batch_mean_var(shape, dtype, contiguous):
    x = torch.randn(shape, dtype=torch.float64).to(dtype) if contiguous else _noncontig(shape, dtype)
    x.requires_grad_()
    mean, var = ops.batch_mean_var(x, backend="torch")
    m_ref, v_ref = mean_var_ref(to_np(x))
    assert mean.shape == x.shape[1:] and var.shape == x.shape[1:]
    np.testing.assert_allclose(to_np(mean), m_ref, **TOL[dtype])
    np.testing.assert_allclose(to_np(var), v_ref, **TOL[dtype])
    # d(sum mean + sum var)/dx = 1/B + 2 (x - mean) / B
    (mean.sum() + var.sum()).backward()
    xs = to_np(x)
    np.testing.assert_allclose(to_np(x.grad), 1 / shape[0] + 2 * (xs - m_ref) / shape[0], **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_stat_matching_loss(shape, dtype, contiguous):
    x = torch.randn(shape, dtype=torch.float64).to(dtype) if contiguous else _noncontig(shape, dtype)
    x.requires_grad_()
    mu = torch.randn(shape[1:], dtype=torch.float64)
    var = torch.rand(shape[1:], dtype=torch.float64)
    loss = ops.stat_matching_loss(x, mu.to(dtype), var.to(dtype), backend="torch")
    ref, grad = stat_matching_ref(to_np(x), to_np(mu.to(dtype)), to_np(var.to(dtype)))
    assert loss.ndim == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(loss.item(), ref, **TOL[dtype])
    loss.backward()
    np.testing.assert_allclose(to_np(x.grad), grad, **TOL[dtype])


def test_stat_matching_zero_when_matched_and_zero_gradient():
    x = torch.randn(6, 4, 5, requires_grad=True)
    mean, var = ops.batch_mean_var(x.detach(), backend="torch")
    loss = ops.stat_matching_loss(x, mean, var, backend="torch")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_stat_matching_module_equals_functional():
    x, mu, var = torch.randn(4, 3, 2), torch.randn(3, 2), torch.rand(3, 2)
    torch.testing.assert_close(
        ops.StatMatchingLoss(mu, var, backend="torch")(x), ops.stat_matching_loss(x, mu, var, backend="torch")
    )


def test_gradcheck_fp64():
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    mu, var = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.stat_matching_loss(t, mu, var, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.batch_mean_var(t, backend="torch"), (x,))


def test_running_stats_large_mean_mixed_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(1e4, 1.0, size=(100_000, 3))
    rs = ops.RunningStats((3,), backend="torch")
    sizes, i = [1, 7, 300, 4096, 2, 999, 31], 0
    while i < len(data):
        n = sizes[(i // 7) % len(sizes)]
        rs.update(torch.from_numpy(data[i : i + n]).float())
        i += n
    assert rs.count == len(data)
    ref = data.astype(np.float32).astype(np.float64)  # the batches were fed as fp32
    np.testing.assert_allclose(rs.mean.numpy(), ref.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rs.var.numpy(), ref.var(0), rtol=1e-4)


def test_running_stats_known_hard_cases():
    rs = ops.RunningStats((1,))
    for v in (2281.5, 2281.25):
        rs.update(torch.tensor([[v]], dtype=torch.float64))
    assert rs.var.item() == 0.015625
    rs = ops.RunningStats((4,))
    x = torch.randn(1000, 4, dtype=torch.float64) * 0.01 + 100
    rs.update(x[:500].float())
    rs.update(x[500:].float())
    np.testing.assert_allclose(rs.var.numpy(), x.float().double().var(0, unbiased=False).numpy(), rtol=1e-6)
    rs = ops.RunningStats((2,))
    rs.update(torch.full((10, 2), 1e7))
    assert rs.var.abs().max().item() == 0.0


def test_running_stats_merge_equals_one_pass_and_is_order_free():
    a_data, b_data = (
        torch.randn(37, 5, 3, dtype=torch.float64),
        torch.randn(11, 5, 3, dtype=torch.float64) + 3,
    )
    a, b, one = ops.RunningStats((5, 3)), ops.RunningStats((5, 3)), ops.RunningStats((5, 3))
    a.update(a_data[:20]), a.update(a_data[20:]), b.update(b_data)
    one.update(torch.cat([a_data, b_data]))
    ab = ops.RunningStats((5, 3))
    ab.merge(a).merge(b)
    ba = ops.RunningStats((5, 3))
    ba.merge(b).merge(a)
    for merged in (ab, ba):
        assert merged.count == 48
        torch.testing.assert_close(merged.mean, one.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.var, one.var, rtol=1e-12, atol=1e-12)


def test_running_stats_state_dict_roundtrip_and_all_reduce_without_group():
    rs = ops.RunningStats((2, 2), dtype=torch.float32)
    rs.update(torch.randn(9, 2, 2))
    other = ops.RunningStats((2, 2), dtype=torch.float32)
    other.load_state_dict(rs.state_dict())
    assert other.count == 9
    torch.testing.assert_close(other.var, rs.var)
    assert rs.all_reduce() is rs and rs.count == 9  # a single process: nothing to exchange


def test_running_stats_bad_input():
    rs = ops.RunningStats((4, 3))
    with pytest.raises(ValueError, match=r"x of shape \(B, 4, 3\), got \(2, 3, 4\)"):
        rs.update(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="feature shape"):
        rs.merge(ops.RunningStats((3,)))
    with pytest.raises(ValueError, match="dtype"):
        ops.RunningStats((3,), dtype=torch.float16)
    with pytest.raises(ValueError, match="device"):
        rs.update(torch.zeros(2, 4, 3, device="meta"))
    with pytest.raises(ValueError, match="feature shape"):
        rs.load_state_dict(ops.RunningStats((3,)).state_dict())


def test_stat_matching_bad_input():
    with pytest.raises(ValueError, match=r"mean of shape \(3, 4\) \(x's feature shape\), got \(4, 3\)"):
        ops.stat_matching_loss(torch.zeros(2, 3, 4), torch.zeros(4, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="var"):
        ops.stat_matching_loss(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="same device"):
        ops.stat_matching_loss(torch.zeros(2, 3), torch.zeros(3, device="meta"), torch.zeros(3))
    with pytest.raises(ValueError, match=r"B >= 1"):
        ops.batch_mean_var(torch.zeros(0, 3))
