"""The Triton kernels on CPU tensors through the interpreter (TRITON_INTERPRET=1, set in conftest).

Every op of ``backend="triton"`` against the float64 numpy references of invcoss/benchmark/refs.py (values and
gradients) and the torch backend: odd shapes (1, primes, rows longer than a tile, several row,
column and depth groups), non-contiguous inputs, fp32/fp16/bf16 with the SPEC 6 tolerances; plus
determinism, the Welford hard cases, and the torch.library registration (fake tensors, opcheck,
torch.compile). The interpreter runs programs one by one in numpy, so shapes stay small.
"""

import os

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import mean_var_ref, repulsive_ref, stat_matching_ref, to_np, tv_ref
from tests.ops.tolerances import tol

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in ops.available_backends(),
        reason="runs the Triton kernels on CPU tensors through TRITON_INTERPRET=1",
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(actual, expected, dtype, numel=0):
    np.testing.assert_allclose(to_np(actual), np.asarray(expected, dtype=np.float64), **tol(dtype, numel))


def _steps(shape, dtype):
    """Values on a 0.5 grid: exact in every dtype, and equal neighbours exercise sign(0) = 0."""
    return (torch.randint(-4, 5, shape) * 0.5).to(dtype)


# ---- total variation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, weights",
    [
        ((2, 3, 37, 41), (1.0, 0.5)),  # prime sizes, two row groups, W not a multiple of the tile
        ((1, 1, 1, 67), (1.0, 1.0)),  # H = 1 contributes nothing
        ((1, 2, 3, 300), (0.5, 2.0)),  # two column groups
        ((1, 2, 9, 5, 7), (2.0, 1.0, 0.25)),  # three depth groups, the depth sign carried across
        ((2, 1, 1, 6, 5), (1.0, 1.0, 1.0)),  # D = 1
        ((1, 1, 1, 1), (1.0, 1.0)),
    ],
    ids=str,
)
def test_tv_matches_reference(shape, weights):
    x = _steps(shape, torch.float32).requires_grad_()
    sums = ops.total_variation(x, "none", weights, backend="triton")
    ref_sums, ref_grad = tv_ref(to_np(x), list(weights))
    _close(sums, ref_sums, torch.float32, x.numel())
    sums.sum().backward()
    _close(x.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tv_dtypes_and_upstream_gradient(dtype):
    x = torch.randn(2, 3, 11, 13).to(dtype).requires_grad_()
    sums = ops.total_variation(x, "none", (1.0, 0.5), backend="triton")
    assert sums.dtype == torch.float32
    ref_sums, ref_grad = tv_ref(to_np(x), [1.0, 0.5])
    _close(sums, ref_sums, dtype)
    upstream = torch.tensor([0.5, -2.0])
    sums.backward(upstream)
    assert x.grad.dtype == dtype
    _close(x.grad, ref_grad * to_np(upstream)[:, None, None, None], dtype)


@pytest.mark.parametrize("ndim", [4, 5])
def test_tv_non_contiguous(ndim):
    if ndim == 4:
        base = _steps((2, 23, 3, 17), torch.float32)
        x = base.permute(0, 2, 3, 1)  # (2, 3, 17, 23), W has stride C*H
        weights = (1.0, 0.5)
    else:
        base = _steps((1, 2, 6, 5, 22), torch.float32)
        x = base[..., ::2].transpose(2, 3)  # (1, 2, 5, 6, 11), strided along W, D and H swapped
        weights = (0.5, 1.0, 2.0)
    assert not x.is_contiguous()
    x.requires_grad_()
    sums = ops.total_variation(x, "none", weights, backend="triton")
    ref_sums, ref_grad = tv_ref(to_np(x), list(weights))
    _close(sums, ref_sums, torch.float32)
    sums.sum().backward()
    _close(x.grad, ref_grad, torch.float32)


def test_tv_reductions_and_no_grad_path():
    x = torch.randn(3, 2, 7, 9)
    ref = ops.total_variation(x, "none", backend="torch")
    with torch.no_grad():  # the kernel skips the gradient writes
        none = ops.total_variation(x, "none", backend="triton")
    _close(none, to_np(ref), torch.float32)
    _close(ops.total_variation(x, "sum", backend="triton"), to_np(ref.sum()), torch.float32)
    _close(ops.total_variation(x, "mean", backend="triton"), to_np(ref.sum()) / x.numel(), torch.float32)


def test_tv_deterministic():
    x = torch.randn(2, 3, 29, 70, requires_grad=True)
    first = ops.total_variation(x, "sum", backend="triton")
    (g1,) = torch.autograd.grad(first, x)
    second = ops.total_variation(x, "sum", backend="triton")
    (g2,) = torch.autograd.grad(second, x)
    assert torch.equal(first, second) and torch.equal(g1, g2)


# ---- Welford statistics and stat matching ---------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 5), (50, 37), (130, 3), (4, 3, 5)],  # one row, two column blocks, three row splits, (B, L, D)
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_mean_var(shape, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype).requires_grad_()
    mean, var = ops.batch_mean_var(x, backend="triton")
    ref_mean, ref_var = mean_var_ref(to_np(x))
    _close(mean, ref_mean, dtype)
    _close(var, ref_var, dtype)
    gm, gv = torch.randn(shape[1:]), torch.randn(shape[1:])
    (mean * gm).sum().add((var * gv).sum()).backward()
    xn, b = to_np(x), shape[0]
    ref_grad = (to_np(gm)[None] + to_np(gv)[None] * 2 * (xn - ref_mean[None])) / b
    _close(x.grad, ref_grad, dtype)


def test_batch_mean_var_non_contiguous_and_one_output():
    x = torch.randn(11, 70)[:, ::2].requires_grad_()  # (11, 35), column stride 2
    mean, var = ops.batch_mean_var(x, backend="triton")
    ref_mean, ref_var = mean_var_ref(to_np(x))
    _close(mean, ref_mean, torch.float32)
    _close(var, ref_var, torch.float32)
    mean.sum().backward()  # the variance's gradient is absent
    _close(x.grad, np.full(x.shape, 1.0 / x.shape[0]), torch.float32)


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_running_stats_large_mean_mixed_batches(state_dtype):
    rng = np.random.default_rng(0)
    data = 1e4 + rng.standard_normal((3000, 2))
    rs = ops.RunningStats((2,), dtype=state_dtype, backend="triton")
    start = 0
    for size in (1, 7, 500, 1492, 1000):
        rs.update(torch.from_numpy(data[start : start + size]).float())
        start += size
    seen = data.astype(np.float32).astype(np.float64)
    assert rs.count == 3000
    np.testing.assert_allclose(to_np(rs.mean), seen.mean(0), rtol=1e-6)
    np.testing.assert_allclose(to_np(rs.var), seen.var(0), rtol=1e-4)


def test_welford_hard_cases():
    mean, var = ops.batch_mean_var(torch.tensor([[2281.5], [2281.25]]), backend="triton")
    assert var.item() == 0.015625 and mean.item() == 2281.375
    # Large mean, small spread (one-pass sums give 0 here, PyTorch issue 40302): fp32 accumulation on
    # shifted data stays within 1e-6 of float64, across tiles (97 rows) and row splits (500 rows).
    for rows, scale, offset in ((97, 0.01, 100.0), (500, 1.0, 1e4)):
        x = (torch.randn(rows, 3, dtype=torch.float64) * scale + offset).float()
        _, var = ops.batch_mean_var(x, backend="triton")
        np.testing.assert_allclose(to_np(var), to_np(x).var(0), rtol=1e-6)
    _, var = ops.batch_mean_var(torch.full((40, 2), 1e7), backend="triton")
    assert torch.equal(var, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_welford_update_matches_torch_backend(dtype):
    x = torch.randn(70, 9).to(dtype)
    for state in (torch.float64, torch.float32):
        mean, m2 = torch.randn(9, dtype=state), torch.rand(9, dtype=state) * 10
        ours = ops.backend_triton.welford_update(x, 13, mean, m2)
        ref = ops.backend_torch.welford_update(x, 13, mean, m2)
        assert ours[0].dtype == state and ours[1].dtype == state
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4), (33, 17), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stat_matching(shape, dtype):
    x = torch.randn(shape).to(dtype).requires_grad_()
    target_mean, target_var = torch.randn(shape[1:]), torch.rand(shape[1:])
    loss = ops.stat_matching_loss(x, target_mean, target_var, backend="triton")
    assert loss.ndim == 0 and loss.dtype == torch.float32
    flat = to_np(x).reshape(shape[0], -1)
    ref_loss, ref_grad = stat_matching_ref(flat, to_np(target_mean).ravel(), to_np(target_var).ravel())
    _close(loss, ref_loss, dtype)
    (3.0 * loss).backward()
    _close(x.grad.reshape(shape[0], -1), 3.0 * ref_grad, dtype)


def test_stat_matching_zero_norm_has_zero_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)  # mean (2, 4), var (1, 4)
    loss = ops.stat_matching_loss(x, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]), backend="triton")
    loss.backward()
    ref_loss, ref_grad = stat_matching_ref(to_np(x), np.array([2.0, 4.0]), np.array([1.0, 1.0]))
    assert loss.item() == 3.0 and ref_loss == 3.0
    assert torch.isfinite(x.grad).all()
    _close(x.grad, ref_grad, torch.float32)


def test_stat_matching_deterministic_and_strided():
    x = torch.randn(40, 90)[:, ::3].requires_grad_()
    mu, var = torch.randn(30), torch.rand(30)
    first = ops.stat_matching_loss(x, mu, var, backend="triton")
    (g1,) = torch.autograd.grad(first, x)
    second = ops.stat_matching_loss(x, mu, var, backend="triton")
    (g2,) = torch.autograd.grad(second, x)
    assert torch.equal(first, second) and torch.equal(g1, g2)
    ref_loss, ref_grad = stat_matching_ref(to_np(x), to_np(mu), to_np(var))
    _close(first, ref_loss, torch.float32)
    _close(g1, ref_grad, torch.float32)


# ---- repulsive loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("b, p, d", [(1, 1, 1), (5, 7, 37), (3, 40, 20)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repulsive_direct(b, p, d, dtype):
    h = torch.randn(b, d).to(dtype).requires_grad_()
    pool = (torch.randn(p, d) * 3).to(dtype)
    loss = ops.repulsive_cosine_loss(h, pool, backend="triton")
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool))
    _close(loss, ref_loss, dtype)
    loss.backward()
    assert h.grad.dtype == dtype
    _close(h.grad, ref_grad, dtype)


def test_repulsive_direct_strided_and_zero_row():
    h = torch.randn(4, 46)[:, ::2].clone()
    h[2] = 0.0  # |h| < eps: the normalisation is a plain scale, no projection
    h = torch.cat([h, h], 1)[:, ::2].requires_grad_()  # (4, 23), column stride 2
    pool = torch.randn(23, 9).T  # (9, 23), transposed
    loss = ops.repulsive_cosine_loss(h, pool, backend="triton")
    (grad,) = torch.autograd.grad(loss, h)
    hr = h.detach().clone().requires_grad_()
    ref = ops.repulsive_cosine_loss(hr, pool, backend="torch")
    ref.backward()
    _close(loss, to_np(ref), torch.float32)
    _close(grad, to_np(hr.grad), torch.float32)
    again = ops.repulsive_cosine_loss(h, pool, backend="triton")
    assert torch.equal(loss, again)


@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_gram_update(gram_dtype):
    gram = torch.randn(21, 21, dtype=gram_dtype)
    feats = torch.nn.functional.normalize(torch.randn(37, 21), dim=1)
    for alpha in (1.0, -1.0):
        expected = gram.clone().addmm_(feats.T.to(gram_dtype), feats.to(gram_dtype), alpha=alpha)
        ops.backend_triton.gram_update(gram, feats, alpha)
        np.testing.assert_allclose(to_np(gram), to_np(expected), rtol=1e-5, atol=1e-5)


def test_repulsive_pool_gram_path_matches_torch():
    dim, eps = 12, 1e-8
    pools = {name: ops.RepulsivePool(30, dim, backend=name, rebuild_every=3) for name in ("triton", "torch")}
    for _ in range(5):  # grows past D = 12, then evicts: the Gram path with rank-k downdates
        feats = torch.randn(9, dim)
        for pool in pools.values():
            pool.push(feats)
        torch.testing.assert_close(pools["triton"].gram, pools["torch"].gram, rtol=1e-5, atol=1e-5)
    assert len(pools["triton"]) == 30 > dim
    h = torch.randn(6, dim).requires_grad_()
    loss = pools["triton"].loss(h)
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pools["torch"].features()), eps)
    _close(loss, ref_loss, torch.float32)
    _close(grad, ref_grad, torch.float32)
    again = pools["triton"].loss(h)
    (grad_again,) = torch.autograd.grad(again, h)
    assert torch.equal(loss, again) and torch.equal(grad, grad_again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repulsive_gram_direct_agree(dtype):
    h = torch.randn(5, 8).to(dtype).requires_grad_()
    pool = torch.nn.functional.normalize(torch.randn(19, 8), dim=1)
    gram = torch.zeros(8, 8)
    ops.backend_triton.gram_update(gram, pool, 1.0)
    via_gram = ops.backend_triton.repulsive_gram(h, gram, 19, 1e-8)
    (g_gram,) = torch.autograd.grad(via_gram, h)
    direct = ops.backend_triton.repulsive_direct(h, pool, 1e-8)
    (g_direct,) = torch.autograd.grad(direct, h)
    _close(via_gram, to_np(direct), dtype)
    _close(g_gram, to_np(g_direct), dtype)


# ---- torch.library registration -------------------------------------------------------------------


def _opcheck_cases():
    x4 = torch.randn(2, 2, 5, 6, requires_grad=True)
    xs = torch.randn(9, 7, requires_grad=True)
    h = torch.randn(3, 5, requires_grad=True)
    return [
        ("tv", (x4, [1.0, 0.5], True)),
        ("batch_mean_var", (xs,)),
        ("stat_matching", (xs, torch.randn(7), torch.rand(7))),
        (
            "batch_mean_var_backward",
            (xs.detach(), torch.randn(7), torch.randn(7), torch.randn(7), torch.ones(2)),
        ),
        (
            "welford_update",
            (xs.detach(), 4, torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64)),
        ),
        ("repulsive_direct", (h, torch.randn(4, 5), 1e-8, True)),
        ("repulsive_gram", (h, torch.eye(5), 5, 1e-8, True)),
        ("gram_update", (torch.zeros(5, 5), torch.randn(3, 5), 1.0)),
    ]


@pytest.mark.parametrize("name, args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    # Schema, fake-tensor implementation and autograd registration of every invcoss_triton op.
    op = getattr(torch.ops.invcoss_triton, name).default
    torch.library.opcheck(
        op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


def test_torch_compile_fullgraph_matches_eager():
    # On CPU tensors the ops are interpreted custom ops with fake implementations: torch.compile
    # traces them as opaque nodes (fullgraph, no graph break) with their autograd formulas. The
    # aot_eager backend runs Dynamo and AOTAutograd, which is where the registration matters; inductor
    # would only add ~20 s of C++ compilation of the surrounding elementwise ops on this CPU.
    def objective(x, feats, h, pool):
        tv = ops.total_variation(x, backend="triton")
        stat = ops.stat_matching_loss(feats, torch.zeros(6), torch.ones(6), backend="triton")
        rep = ops.repulsive_cosine_loss(h, pool, backend="triton")
        return 0.1 * tv + stat + 0.1 * rep

    inputs = [torch.randn(2, 1, 6, 7), torch.randn(5, 6), torch.randn(3, 4), torch.randn(5, 4)]
    eager_in = [t.clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    comp_in = [t.clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    eager = objective(*eager_in)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")(*comp_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(comp_in[:3], eager_in[:3]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
