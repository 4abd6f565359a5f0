"""The C++ CPU kernels of ``invcoss._C`` (``backend="cpu"``), and on a GPU machine the CUDA ones.

Every op against the float64 numpy references of invcoss/benchmark/refs.py (values and gradients) or the torch
backend: odd shapes (1, primes, more rows than a row block, more columns than a tile, pools longer
than a matmul tile), non-contiguous inputs, fp32/fp16/bf16/fp64 with the SPEC 6 tolerances;
gradcheck in fp64 and opcheck through ``torch.ops.invcoss.*``; bit-identical results with 1 and 2
OpenMP threads; torch.compile(fullgraph=True); the argument checks of the kernels.
"""

import numpy as np
import pytest
import torch

from invcoss import _ext, ops
from invcoss.benchmark.refs import mean_var_ref, repulsive_ref, stat_matching_ref, to_np, tv_ref
from invcoss.ops import backend_torch
from tests.ops.tolerances import tol

if _ext.C is None:
    pytest.skip(f"the extension invcoss._C is not built: {_ext.IMPORT_ERROR}", allow_module_level=True)

from invcoss.ops import backend_ext  # noqa: E402  (imports only with the extension built)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
needs_cuda = pytest.mark.skipif(
    not (_ext.HAS_CUDA and torch.cuda.is_available()), reason="needs the CUDA kernels and a CUDA device"
)


def _close(actual, expected, dtype, numel=0):
    np.testing.assert_allclose(to_np(actual), np.asarray(expected, dtype=np.float64), **tol(dtype, numel))


def _steps(shape, dtype):
    """Values on a 0.5 grid: exact in every dtype, and equal neighbours exercise sign(0) = 0."""
    return (torch.randint(-4, 5, shape) * 0.5).to(dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- total variation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, weights",
    [
        ((2, 3, 37, 41), (1.0, 0.5)),  # primes; 37 rows = three row chunks, the last one short
        ((1, 1, 1, 67), (1.0, 1.0)),  # H = 1 contributes nothing
        ((3, 1, 5, 1), (1.0, 2.0)),  # W = 1: every value is both ends of its row
        ((1, 1, 2, 2), (1.0, 1.0)),  # W = 2: no interior
        ((1, 2, 9, 5, 7), (2.0, 1.0, 0.25)),
        ((2, 1, 1, 6, 5), (1.0, 1.0, 1.0)),  # D = 1
        ((1, 1, 1, 1), (1.0, 1.0)),
        ((1, 1, 1, 1, 1), (1.0, 1.0, 1.0)),
    ],
    ids=str,
)
def test_tv_matches_reference(shape, weights):
    x = _steps(shape, torch.float32).requires_grad_()
    sums = ops.total_variation(x, "none", weights, backend="cpu")
    ref_sums, ref_grad = tv_ref(to_np(x), list(weights))
    _close(sums, ref_sums, torch.float32, x.numel())
    sums.sum().backward()
    _close(x.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tv_dtypes_and_upstream_gradient(dtype, ndim):
    shape = (2, 3, 11, 13) if ndim == 4 else (2, 2, 3, 11, 13)
    weights = (1.0, 0.5) if ndim == 4 else (0.25, 1.0, 0.5)
    x = torch.randn(shape).to(dtype).requires_grad_()
    sums = ops.total_variation(x, "none", weights, backend="cpu")
    assert sums.dtype == _acc(dtype)
    ref_sums, ref_grad = tv_ref(to_np(x), list(weights))
    _close(sums, ref_sums, dtype)
    upstream = torch.tensor([0.5, -2.0], dtype=_acc(dtype))
    sums.backward(upstream)
    assert x.grad.dtype == dtype
    _close(x.grad, ref_grad * to_np(upstream).reshape(-1, *[1] * (ndim - 1)), dtype)


@pytest.mark.parametrize("ndim", [4, 5])
def test_tv_non_contiguous(ndim):
    if ndim == 4:
        x = _steps((2, 23, 3, 17), torch.float32).permute(0, 2, 3, 1)  # (2, 3, 17, 23)
        weights = (1.0, 0.5)
    else:
        x = _steps((1, 2, 6, 5, 22), torch.float32)[..., ::2].transpose(2, 3)  # (1, 2, 5, 6, 11)
        weights = (0.5, 1.0, 2.0)
    assert not x.is_contiguous()
    x.requires_grad_()
    sums = ops.total_variation(x, "none", weights, backend="cpu")
    ref_sums, ref_grad = tv_ref(to_np(x), list(weights))
    _close(sums, ref_sums, torch.float32)
    sums.sum().backward()
    _close(x.grad, ref_grad, torch.float32)


def test_tv_reductions_large_and_no_grad_path():
    x = torch.randn(3, 2, 70, 90)  # 37800 values: the parallel path
    ref = ops.total_variation(x, "none", backend="torch")
    with torch.no_grad():  # the kernel skips the gradient
        none = ops.total_variation(x, "none", backend="cpu")
        _, grad = torch.ops.invcoss.tv(x, [1.0, 1.0], False)
    assert grad.numel() == 0
    _close(none, to_np(ref), torch.float32)
    _close(ops.total_variation(x, "sum", backend="cpu"), to_np(ref.sum()), torch.float32)
    _close(ops.total_variation(x, "mean", backend="cpu"), to_np(ref.sum()) / x.numel(), torch.float32)
    module = ops.TotalVariation(reduction="sum", backend="cpu")
    assert torch.equal(module(x), ops.total_variation(x, "sum", backend="cpu"))


def test_tv_backward_without_fused_gradient_raises():
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    sums, _ = torch.ops.invcoss.tv(x, [1.0, 1.0], False)  # forward told that no gradient is wanted
    with pytest.raises(RuntimeError, match="with_grad=True"):
        sums.sum().backward()


# ---- Welford statistics and stat matching ---------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 5), (50, 37), (130, 3), (4, 3, 5), (67, 1100)],  # one row; row blocks of 64; two column tiles
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_mean_var(shape, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype).requires_grad_()
    mean, var = ops.batch_mean_var(x, backend="cpu")
    assert mean.dtype == _acc(dtype)
    ref_mean, ref_var = mean_var_ref(to_np(x))
    _close(mean, ref_mean, dtype)
    _close(var, ref_var, dtype)
    gm, gv = torch.randn(shape[1:]), torch.randn(shape[1:])
    (mean * gm).sum().add((var * gv).sum()).backward()
    xn, b = to_np(x), shape[0]
    ref_grad = (to_np(gm)[None] + to_np(gv)[None] * 2 * (xn - ref_mean[None])) / b
    _close(x.grad, ref_grad, dtype)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(11, 70)[:, ::2],  # column stride 2: copied
        lambda: torch.randn(11, 70)[:, 3:40],  # row stride 70, unit column stride: read in place
        lambda: torch.randn(1, 35).expand(9, 35),  # row stride 0
    ],
    ids=["col-strided", "row-strided", "expanded"],
)
def test_batch_mean_var_non_contiguous_and_one_output(make):
    x = make().requires_grad_()
    mean, var = ops.batch_mean_var(x, backend="cpu")
    ref_mean, ref_var = mean_var_ref(to_np(x))
    _close(mean, ref_mean, torch.float32)
    _close(var, ref_var, torch.float32)
    mean.sum().backward()  # the variance's gradient is absent
    _close(x.grad, np.full(x.shape, 1.0 / x.shape[0]), torch.float32)


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_running_stats_large_mean_mixed_batches(state_dtype):
    # SPEC 2.2: mean 1e4, std 1, 1e5 samples in batches of mixed sizes: var within 1e-4 relative.
    rng = np.random.default_rng(0)
    data = 1e4 + rng.standard_normal((100_000, 3))
    rs = ops.RunningStats((3,), dtype=state_dtype, backend="cpu")
    start = 0
    for size in (1, 7, 500, 1492, 40_000, 58_000):
        rs.update(torch.from_numpy(data[start : start + size]).float())
        start += size
    seen = data.astype(np.float32).astype(np.float64)
    assert rs.count == 100_000
    np.testing.assert_allclose(to_np(rs.mean), seen.mean(0), rtol=1e-6)
    np.testing.assert_allclose(to_np(rs.var), seen.var(0), rtol=1e-4)


def test_welford_hard_cases():
    mean, var = ops.batch_mean_var(torch.tensor([[2281.5], [2281.25]]), backend="cpu")
    assert var.item() == 0.015625 and mean.item() == 2281.375
    x = torch.randn(97, 3, dtype=torch.float64) * 0.01 + 100  # one-pass sums give 0 here
    _, var = ops.batch_mean_var(x.float(), backend="cpu")
    np.testing.assert_allclose(to_np(var), to_np(x.float()).var(0), rtol=1e-4)
    _, var = ops.batch_mean_var(torch.full((40, 2), 1e7), backend="cpu")
    assert torch.equal(var, torch.zeros(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state", [torch.float64, torch.float32])
@pytest.mark.parametrize("count", [0, 13])
def test_welford_update_matches_torch_backend(dtype, state, count):
    x = (torch.randn(130, 1030) * 2 + 3).to(dtype)  # three row blocks, two column tiles
    mean, m2 = torch.randn(1030, dtype=state), torch.rand(1030, dtype=state) * 10
    ours = backend_ext.welford_update(x, count, mean, m2)
    ref = backend_torch.welford_update(x, count, mean, m2)
    for a, b in zip(ours, ref):
        assert a.dtype == state
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-5)


def test_running_stats_module_matches_torch_backend():
    ours, ref = ops.RunningStats((4, 9), backend="cpu"), ops.RunningStats((4, 9), backend="torch")
    for n in (5, 1, 70):
        x = torch.randn(n, 4, 9) * 5 - 2
        ours.update(x)
        ref.update(x)
    assert ours.count == ref.count == 76
    np.testing.assert_allclose(to_np(ours.mean), to_np(ref.mean), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_np(ours.var), to_np(ref.var), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 4), (33, 17), (3, 5, 7), (70, 1031)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stat_matching(shape, dtype):
    x = torch.randn(shape).to(dtype).requires_grad_()
    target_mean, target_var = torch.randn(shape[1:]), torch.rand(shape[1:])
    loss = ops.stat_matching_loss(x, target_mean, target_var, backend="cpu")
    assert loss.ndim == 0 and loss.dtype == _acc(dtype)
    flat = to_np(x).reshape(shape[0], -1)
    ref_loss, ref_grad = stat_matching_ref(flat, to_np(target_mean).ravel(), to_np(target_var).ravel())
    _close(loss, ref_loss, dtype)
    (3.0 * loss).backward()
    _close(x.grad.reshape(shape[0], -1), 3.0 * ref_grad, dtype)


def test_stat_matching_zero_norm_has_zero_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)  # mean (2, 4), var (1, 4)
    loss = ops.stat_matching_loss(x, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]), backend="cpu")
    loss.backward()
    ref_loss, ref_grad = stat_matching_ref(to_np(x), np.array([2.0, 4.0]), np.array([1.0, 1.0]))
    assert loss.item() == 3.0 and ref_loss == 3.0
    assert torch.isfinite(x.grad).all()
    _close(x.grad, ref_grad, torch.float32)


def test_stat_matching_strided_fp64_targets_and_module():
    x = torch.randn(40, 90)[:, ::3].requires_grad_()
    mu, var = torch.randn(30, dtype=torch.float64), torch.rand(30, dtype=torch.float64)
    loss = ops.StatMatchingLoss(mu, var, backend="cpu")(x)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_grad = stat_matching_ref(to_np(x), to_np(mu), to_np(var))
    _close(loss, ref_loss, torch.float32)
    _close(grad, ref_grad, torch.float32)


# ---- repulsive loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("b, p, d", [(1, 1, 1), (5, 7, 37), (3, 40, 20), (4, 2500, 6)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repulsive_direct(b, p, d, dtype):
    h = torch.randn(b, d).to(dtype).requires_grad_()
    pool = (torch.randn(p, d) * 3).to(dtype)  # (4, 2500, 6): two matmul tiles, the second partial
    loss = ops.repulsive_cosine_loss(h, pool, backend="cpu")
    assert loss.dtype == _acc(dtype)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool))
    _close(loss, ref_loss, dtype)
    loss.backward()
    assert h.grad.dtype == dtype
    _close(h.grad, ref_grad, dtype)
    with torch.no_grad():  # the loss-only path: sum of squared cosines, no second matmul
        h0 = h.detach().clone()
        h0[0] = 0.0  # a zero row has zero cosines
        fwd_only = ops.repulsive_cosine_loss(h0, pool, backend="cpu")
    ref_zero, _ = repulsive_ref(to_np(h0), to_np(pool))
    assert fwd_only.dtype == _acc(dtype)
    _close(fwd_only, ref_zero, dtype)


def test_repulsive_direct_strided_zero_row_and_empty_pool():
    h = torch.randn(4, 46)[:, ::2].clone()
    h[2] = 0.0  # |h| < eps: the normalisation is a plain scale, no projection
    h = torch.cat([h, h], 1)[:, ::2].requires_grad_()  # (4, 23), column stride 2
    pool = torch.randn(23, 9).T  # (9, 23), transposed
    loss = ops.repulsive_cosine_loss(h, pool, backend="cpu")
    (grad,) = torch.autograd.grad(loss, h)
    hr = h.detach().clone().requires_grad_()
    ref = ops.repulsive_cosine_loss(hr, pool, backend="torch")
    ref.backward()
    _close(loss, to_np(ref), torch.float32)
    _close(grad, to_np(hr.grad), torch.float32)
    empty = ops.repulsive_cosine_loss(h, torch.zeros(0, 23), backend="cpu")
    (g0,) = torch.autograd.grad(empty, h)
    assert empty.item() == 0.0 and torch.equal(g0, torch.zeros_like(h))


@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_gram_update(gram_dtype):
    gram = torch.randn(21, 21, dtype=gram_dtype)
    feats = torch.nn.functional.normalize(torch.randn(37, 21), dim=1)
    for alpha in (1.0, -1.0):
        expected = gram.clone().addmm_(feats.T.to(gram_dtype), feats.to(gram_dtype), alpha=alpha)
        backend_ext.gram_update(gram, feats, alpha)
        np.testing.assert_allclose(to_np(gram), to_np(expected), rtol=1e-5, atol=1e-5)


def test_repulsive_pool_gram_path_matches_torch():
    dim, eps = 12, 1e-8
    pools = {name: ops.RepulsivePool(30, dim, backend=name, rebuild_every=3) for name in ("cpu", "torch")}
    for _ in range(5):  # grows past D = 12, then evicts: the Gram path with rank-k downdates
        feats = torch.randn(9, dim)
        for pool in pools.values():
            pool.push(feats)
        torch.testing.assert_close(pools["cpu"].gram, pools["torch"].gram, rtol=1e-5, atol=1e-5)
    assert len(pools["cpu"]) == 30 > dim
    h = torch.randn(6, dim).requires_grad_()
    loss = pools["cpu"].loss(h)
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pools["torch"].features()), eps)
    _close(loss, ref_loss, torch.float32)
    _close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repulsive_gram_direct_agree(dtype):
    h = torch.randn(5, 8).to(dtype).requires_grad_()
    pool = torch.nn.functional.normalize(torch.randn(19, 8, dtype=_acc(dtype)), dim=1)
    gram = torch.zeros(8, 8, dtype=torch.float64)
    backend_ext.gram_update(gram, pool, 1.0)
    via_gram = backend_ext.repulsive_gram(h, gram, 19, 1e-8)
    (g_gram,) = torch.autograd.grad(via_gram, h)
    direct = backend_ext.repulsive_direct(h, pool, 1e-8)
    (g_direct,) = torch.autograd.grad(direct, h)
    _close(via_gram, to_np(direct), dtype)
    _close(g_gram, to_np(g_direct), dtype)


# ---- gradcheck and opcheck through torch.ops.invcoss -----------------------------------------------


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _sym_gram(d, n):
    p = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    return p.T @ p


_F64 = torch.float64


@pytest.mark.parametrize(
    "fn, make",
    [
        (lambda x: torch.ops.invcoss.tv(x, [1.0, 0.5], True)[0], lambda: (_f64(2, 2, 5, 4),)),
        (lambda x: torch.ops.invcoss.tv(x, [0.5, 1.0, 2.0], True)[0], lambda: (_f64(2, 1, 3, 4, 5),)),
        (torch.ops.invcoss.batch_mean_var, lambda: (_f64(7, 5),)),
        (
            lambda x, m, v: torch.ops.invcoss.stat_matching(x, m, v)[0],
            lambda: (_f64(6, 5), torch.zeros(5, dtype=_F64), torch.ones(5, dtype=_F64)),
        ),
        (
            lambda h, p: torch.ops.invcoss.repulsive_direct(h, p, 1e-8, True)[0],
            lambda: (_f64(3, 4), torch.randn(9, 4, dtype=_F64)),
        ),
        (
            lambda h, g: torch.ops.invcoss.repulsive_gram(h, g, 9, 1e-8, True)[0],
            lambda: (_f64(3, 4), _sym_gram(4, 9)),
        ),
    ],
    ids=["tv2d", "tv3d", "batch_mean_var", "stat_matching", "repulsive_direct", "repulsive_gram"],
)
def test_gradcheck_fp64(fn, make):
    assert torch.autograd.gradcheck(fn, make())


def _opcheck_cases():
    x4 = torch.randn(2, 2, 5, 6, requires_grad=True)
    xs = torch.randn(9, 7, requires_grad=True)
    h = torch.randn(3, 5, requires_grad=True)
    return [
        ("tv", (x4, [1.0, 0.5], True)),
        ("tv", (torch.randn(1, 2, 3, 4, 5), [1.0, 1.0, 1.0], False)),
        ("scale_rows", (torch.randn(3, 4, 5), torch.randn(3))),
        ("batch_mean_var", (xs,)),
        ("batch_mean_var_backward", (xs.detach(), torch.randn(7), torch.randn(7), torch.randn(7))),
        (
            "welford_update",
            (xs.detach(), 4, torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64)),
        ),
        ("stat_matching", (xs, torch.randn(7), torch.rand(7))),
        ("repulsive_direct", (h, torch.randn(4, 5), 1e-8, True)),
        ("repulsive_gram", (h, torch.eye(5), 5, 1e-8, True)),
        ("gram_update", (torch.zeros(5, 5), torch.randn(3, 5), 1.0)),
    ]


@pytest.mark.parametrize("name, args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    # Schema, fake kernel, autograd registration and AOT dispatch of every invcoss op.
    torch.library.opcheck(getattr(torch.ops.invcoss, name).default, args)


def test_torch_compile_fullgraph_matches_eager():
    def objective(x, feats, h, pool):
        tv = ops.total_variation(x, backend="cpu")
        stat = ops.stat_matching_loss(feats, torch.zeros(6), torch.ones(6), backend="cpu")
        rep = ops.repulsive_cosine_loss(h, pool, backend="cpu")
        return 0.1 * tv + stat + 0.1 * rep.square()

    inputs = [torch.randn(2, 1, 6, 7), torch.randn(5, 6), torch.randn(3, 4), torch.randn(5, 4)]
    eager_in = [t.clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    comp_in = [t.clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    eager = objective(*eager_in)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(objective, fullgraph=True)(*comp_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(comp_in[:3], eager_in[:3]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


# ---- OpenMP: the same bits with 1 and 2 threads ---------------------------------------------------


@pytest.fixture
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _all_ops_once():
    """Every reduction kernel, forward and backward, on inputs large enough for the parallel paths.

    (The repulsive ops reduce inside MKL's matmuls, whose bits across thread counts are MKL's.)
    """
    g = torch.Generator().manual_seed(3)
    out = []
    x = torch.randn(3, 2, 200, 230, generator=g).requires_grad_()
    out.append(ops.total_variation(x, "none", (1.0, 0.3), backend="cpu"))
    out[-1].sum().backward()
    out.append(x.grad)
    x5 = torch.randn(2, 1, 9, 130, 150, generator=g).requires_grad_()
    out.append(ops.total_variation(x5, "none", backend="cpu"))
    out[-1].sum().backward()
    out.append(x5.grad)
    f = (torch.randn(70, 4000, generator=g) + 3).requires_grad_()
    loss = ops.stat_matching_loss(f, torch.zeros(4000), torch.ones(4000), backend="cpu")
    loss.backward()
    out += [loss, f.grad, *ops.batch_mean_var(f.detach(), backend="cpu")]
    state = (
        torch.randn(4000, generator=g, dtype=torch.float64),
        torch.rand(4000, generator=g, dtype=torch.float64),
    )
    out += list(backend_ext.welford_update(f.detach(), 11, *state))
    return out


def test_results_identical_with_1_and_2_threads(restore_threads):
    torch.set_num_threads(1)
    assert _ext.C.omp_threads() == 1
    one = _all_ops_once()
    torch.set_num_threads(2)
    assert _ext.C.omp_threads() == 2  # the kernels' OpenMP regions really run on two threads
    two = _all_ops_once()
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ---- argument checks of the kernels ---------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: torch.ops.invcoss.tv(torch.randn(3, 4), [1.0, 1.0], False),
            r"tv: expected x of shape \(B, C, H, W\)",
        ),
        (lambda: torch.ops.invcoss.tv(torch.randn(1, 1, 3, 4), [1.0], False), "one weight per spatial axis"),
        (
            lambda: torch.ops.invcoss.tv(torch.ones(1, 1, 3, 4, dtype=torch.int32), [1.0, 1.0], False),
            "floating",
        ),
        (
            lambda: torch.ops.invcoss.batch_mean_var(torch.randn(3)),
            r"batch_mean_var: expected x of shape \(N, F\)",
        ),
        (
            lambda: torch.ops.invcoss.stat_matching(torch.randn(3, 4), torch.randn(5), torch.randn(4)),
            r"stat_matching: expected mean of shape \(4,\)",
        ),
        (
            lambda: torch.ops.invcoss.welford_update(
                torch.randn(3, 4), 0, torch.randn(4).half(), torch.randn(4)
            ),
            "both fp32 or both fp64",
        ),
        (
            lambda: torch.ops.invcoss.repulsive_direct(torch.randn(3, 4), torch.randn(0, 4), 1e-8, False),
            r"expected pool of shape \(P, 4\) with P >= 1",
        ),
        (
            lambda: torch.ops.invcoss.repulsive_gram(torch.randn(3, 4), torch.randn(4, 5), 3, 1e-8, False),
            r"expected gram of shape \(4, 4\)",
        ),
        (
            lambda: torch.ops.invcoss.scale_rows(torch.randn(3, 4), torch.randn(4)),
            r"expected scale of shape \(3,\)",
        ),
    ],
    ids=[
        "tv-rank",
        "tv-weights",
        "tv-dtype",
        "cols-rank",
        "stat-shape",
        "state-dtype",
        "pool",
        "gram",
        "scale",
    ],
)
def test_kernel_argument_checks(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- the CUDA kernels (on a GPU machine) ----------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_kernels_match_torch_backend(dtype):
    dev = "cuda"
    cases = [
        lambda b: ops.total_variation(x4, "none", (1.0, 0.5), backend=b),
        lambda b: ops.total_variation(x5, "none", (0.5, 1.0, 2.0), backend=b),
        lambda b: ops.stat_matching_loss(f, mu, var, backend=b),
        lambda b: ops.batch_mean_var(f, backend=b)[1],
        lambda b: ops.repulsive_cosine_loss(h, pool, backend=b),
    ]
    x4 = torch.randn(3, 2, 37, 41, device=dev).to(dtype).requires_grad_()
    x5 = torch.randn(2, 1, 5, 17, 19, device=dev).to(dtype).requires_grad_()
    f = (torch.randn(300, 1031, device=dev) + 2).to(dtype).requires_grad_()
    mu, var = torch.randn(1031, device=dev), torch.rand(1031, device=dev)
    h = torch.randn(7, 33, device=dev).to(dtype).requires_grad_()
    pool = torch.randn(9000, 33, device=dev)  # two pool tiles
    for case in cases:
        inputs = [x4, x5, f, h]
        got = case("cuda")
        got_grads = torch.autograd.grad(got.sum(), inputs, allow_unused=True)
        want = case("torch")
        want_grads = torch.autograd.grad(want.sum(), inputs, allow_unused=True)
        _close(got, to_np(want), dtype, f.numel())
        for a, b in zip(got_grads, want_grads):
            if b is not None:
                _close(a, to_np(b), dtype)
        again = case("cuda")
        assert torch.equal(got, again)  # deterministic: partials and a second pass, no atomics


@needs_cuda
@pytest.mark.parametrize("state", [torch.float64, torch.float32])
def test_cuda_running_stats_and_pool(state):
    rng = np.random.default_rng(0)
    data = torch.from_numpy(1e4 + rng.standard_normal((20_000, 3))).float().cuda()
    rs = ops.RunningStats((3,), device="cuda", dtype=state, backend="cuda")
    for chunk in data.split([1, 7, 4000, 15_992]):
        rs.update(chunk)
    seen = to_np(data)
    np.testing.assert_allclose(to_np(rs.var), seen.var(0), rtol=1e-4)
    pool = ops.RepulsivePool(64, 16, device="cuda", backend="cuda")
    pool.push(torch.randn(64, 16, device="cuda"))
    h = torch.randn(5, 16, device="cuda", requires_grad=True)
    loss = pool.loss(h)
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss, ref_grad = repulsive_ref(to_np(h), to_np(pool.features()))
    _close(loss, ref_loss, torch.float32)
    _close(grad, ref_grad, torch.float32)
