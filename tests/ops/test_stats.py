"""batch_mean_var, welford_update, RunningStats (Eq. 9) and stat_matching_loss (Eq. 3) on every
backend against float64 numpy (SPEC 2.2).

Shapes (one row, row blocks, column tiles, ``(B, L, D)`` features), every dtype and memory layout
forward and backward, the Welford hard cases (large mean and small spread, identical rows), the
SPEC's running-statistics bar, merges, state dicts, module == functional, determinism, gradcheck in
fp64, the kernels' argument checks and registration (opcheck); the extension's results do not depend
on the thread count.
"""

import numpy as np
import pytest
import torch

from invcoss import ops
from invcoss.benchmark.refs import mean_var_ref, stat_matching_ref, to_np
from tests.ops.backends import (
    DEVICE,
    EXT,
    FP64_BACKENDS,
    assert_same_bits_with_1_and_2_threads,
    backend_dtypes,
    backend_module,
    interpreted,
    make,
    opcheck,
    opcheck_cases,
    shape_layouts,
    sizes,
)
from tests.ops.tolerances import (
    RUNNING_STATS,
    WELFORD_HARD_FUSED,
    assert_matches,
    plain_mean_var,
    plain_stat_matching,
    plain_with_grad,
    welford_hard,
)

# One row; row blocks of 64 (three, the last short); one column and a few; two column tiles; (B, L, D).
SHAPES = sizes(
    [(1, 1), (1, 5), (2, 3), (13, 1), (50, 37), (130, 3), (67, 1100), (4, 3, 5), (5, 3, 11), (4, 17, 2, 3)],
    [(48, 145, 768)],  # 3D ViT-B block outputs
)
STAT_SHAPES = sizes([(1, 4), (33, 17), (3, 5, 7), (70, 1031), (2, 3), (4, 17, 2, 3)], [(48, 145, 768)])
DTYPE_SHAPES = shape_layouts([(50, 37), (4, 3, 5)], [(64, 197, 32)])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_var_grad_ref(x: np.ndarray, gm: np.ndarray, gv: np.ndarray) -> np.ndarray:
    """d/dx of sum(mean * gm) + sum(var * gv): (gm + 2 gv (x - mean)) / B."""
    return (gm[None] + gv[None] * 2 * (x - x.mean(0)[None])) / x.shape[0]


def _check_mean_var(backend, x, dtype, numel=0):
    x.requires_grad_()
    mean, var = ops.batch_mean_var(x, backend=backend)
    assert mean.shape == var.shape == x.shape[1:] and mean.dtype == var.dtype == _acc(dtype)
    gm, gv = (torch.randn(x.shape[1:], device=DEVICE, dtype=_acc(dtype)) for _ in range(2))
    (mean * gm).sum().add((var * gv).sum()).backward()
    assert x.grad.dtype == dtype
    xp = x.detach().clone().requires_grad_()
    pm, pv = plain_mean_var(xp)
    (pm * gm.to(dtype)).sum().add((pv * gv.to(dtype)).sum()).backward()
    ref_mean, ref_var = mean_var_ref(to_np(x))
    assert_matches(mean, ref_mean, dtype, numel, plain=pm)
    assert_matches(var, ref_var, dtype, numel, plain=pv)
    ref_grad = _mean_var_grad_ref(to_np(x), to_np(gm), to_np(gv))
    assert_matches(x.grad, ref_grad, dtype, plain=xp.grad, backend=backend)


def _check_stat_matching(backend, x, dtype, numel=0):
    x.requires_grad_()
    mu = torch.randn(x.shape[1:], device=DEVICE, dtype=_acc(dtype))
    var = torch.rand(x.shape[1:], device=DEVICE, dtype=_acc(dtype))
    loss = ops.stat_matching_loss(x, mu, var, backend=backend)
    assert loss.ndim == 0 and loss.dtype == _acc(dtype)
    (3.0 * loss).backward()
    assert x.grad.dtype == dtype
    b = x.shape[0]
    ref_loss, ref_grad = stat_matching_ref(to_np(x).reshape(b, -1), to_np(mu).ravel(), to_np(var).ravel())
    plain, plain_grad = plain_with_grad(plain_stat_matching, x, mu, var, upstream=torch.tensor(3.0))
    assert_matches(loss, ref_loss, dtype, numel, plain=plain)
    assert_matches(
        x.grad.reshape(b, -1), 3.0 * ref_grad, dtype, plain=plain_grad.reshape(b, -1), backend=backend
    )


# ---- batch_mean_var ---------------------------------------------------------------------------------


@pytest.mark.device
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_mean_var_shapes(backend, shape):
    _check_mean_var(backend, make(shape, scale=3.0, shift=1.0), torch.float32)


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(), indirect=["backend"])
@pytest.mark.parametrize("shape, layout", DTYPE_SHAPES)
def test_batch_mean_var_dtypes_and_layouts(backend, dtype, shape, layout):
    x = make(shape, dtype, layout, scale=3.0, shift=1.0)
    _check_mean_var(backend, x, dtype, x.numel())


@pytest.mark.device
@pytest.mark.parametrize(
    "make_x",
    [
        lambda: make((11, 70))[:, ::2],  # column stride 2
        lambda: make((1, 35)).expand(9, 35),  # row stride 0
    ],
    ids=["col-strided", "expanded"],
)
def test_batch_mean_var_strided_and_one_output(backend, make_x):
    x = make_x().requires_grad_()
    mean, var = ops.batch_mean_var(x, backend=backend)
    ref_mean, ref_var = mean_var_ref(to_np(x))
    assert_matches(mean, ref_mean, torch.float32)
    assert_matches(var, ref_var, torch.float32)
    mean.sum().backward()  # the variance's gradient is absent
    assert_matches(x.grad, np.full(x.shape, 1.0 / x.shape[0]), torch.float32)


# The kernels' access paths. CPU: items of whole rows (row chunks of 512 merged in order, a first
# block of 8 rows, then blocks of 64 rows read 16, 8, 4 and 1 at a time), merged around the running
# mean, which a drift along the rows keeps far from the next block's values. CUDA: 16-byte vector loads (4 fp32, 8
# bf16/fp16 columns) when the rows allow them, else one column per lane; row segments of >= 256
# rows, rounds of several rows per thread and a partial last round.
PATH_CASES = {
    "one-row": lambda dt: make((1, 64), dt),
    "prime-width": lambda dt: make((7, 13), dt),
    "vector-width": lambda dt: make((37, 48), dt),
    "row-stride-41": lambda dt: make((9, 41), dt)[:, 1:],  # 40 columns, rows not 16-byte aligned
    "offset-by-one": lambda dt: make((9 * 40 + 1,), dt)[1:].view(9, 40),  # contiguous, misaligned start
    "chunks-vector": lambda dt: make((2100, 48), dt, scale=2.0, shift=5.0),
    "chunks-prime": lambda dt: make((2100, 37), dt, scale=2.0, shift=5.0),
    "chunks-drift": lambda dt: (
        make((2100, 37), torch.float64, scale=0.5, shift=20.0)
        + torch.linspace(0, 40, 2100, dtype=torch.float64, device=DEVICE)[:, None]
    ).to(dt),
}
PATH_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.device
@pytest.mark.parametrize("dtype", PATH_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", PATH_CASES)
def test_stats_access_paths(backend, case, dtype):
    if interpreted(backend) and case.startswith("chunks") and dtype != torch.float32:
        pytest.skip("the interpreter is slow; fp32 covers the row splits of the Triton kernels")
    x = PATH_CASES[case](dtype)
    _check_mean_var(backend, x, dtype, x.numel())
    _check_stat_matching(backend, PATH_CASES[case](dtype), dtype, x.numel())
    f = x.shape[1]
    state = (
        torch.randn(f, dtype=torch.float64, device=DEVICE),
        torch.rand(f, dtype=torch.float64, device=DEVICE),
    )
    new_mean, new_m2 = backend_module(backend).welford_update(x.detach(), 5, *state)
    ref_mean, ref_m2 = _chan_ref(to_np(x), 5, to_np(state[0]), to_np(state[1]))
    assert_matches(new_mean, ref_mean, torch.float64)  # accumulated in the fp64 state's precision
    assert_matches(new_m2, ref_m2, torch.float64)


@pytest.mark.device
def test_stats_outlier_first_row(backend):
    # A first row 1000 standard deviations out: it is the shift of every value, and on CPU it pulls
    # the first block's mean, the centre of the one-pass blocks after it, far from the other rows.
    # The variance keeps fp32's relative bar; the mean, computed from values shifted by that row, is
    # as precise as a sum of terms of its magnitude.
    x = make((1100, 37), torch.float64)
    x[0] += 1e3
    x = x.to(torch.float32)
    mean, var = ops.batch_mean_var(x, backend=backend)
    ref_mean, ref_var = mean_var_ref(to_np(x))
    assert_matches(var, ref_var, torch.float32)
    assert_matches(mean, ref_mean, torch.float32, scale=float(x.abs().max()))


# ---- Welford: one batch into a running state, and RunningStats ----------------------------------------


def _chan_ref(x: np.ndarray, count: int, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 9: the state of ``count`` samples (mean, m2) merged with the batch x, in float64."""
    n_b, mean_b, m2_b = x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
    if count == 0:
        return mean_b, m2_b
    n, delta = count + n_b, mean_b - mean
    return mean + delta * n_b / n, m2 + m2_b + delta**2 * count * n_b / n


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(), indirect=["backend"])
@pytest.mark.parametrize("state", [torch.float64, torch.float32], ids=["state-f64", "state-f32"])
@pytest.mark.parametrize("count", [0, 13])
def test_welford_update(backend, dtype, state, count):
    # Three row blocks and two column tiles (a small block under the interpreter).
    shape = (70, 9) if interpreted(backend) else (130, 1030)
    x = make(shape, dtype, scale=2.0, shift=3.0)
    mean = torch.randn(shape[1], dtype=state, device=DEVICE)
    m2 = torch.rand(shape[1], dtype=state, device=DEVICE) * 10
    if count == 0:  # the empty state, as RunningStats holds it before its first update
        mean, m2 = mean * 0, m2 * 0
    new_mean, new_m2 = backend_module(backend).welford_update(x, count, mean, m2)
    assert new_mean.dtype == new_m2.dtype == state
    ref_mean, ref_m2 = _chan_ref(to_np(x), count, to_np(mean), to_np(m2))
    # The state accumulates in its own dtype, whatever the data's.
    assert_matches(new_mean, ref_mean, state)
    assert_matches(new_m2, ref_m2, state)


@pytest.mark.device
@pytest.mark.parametrize("state", [torch.float64, torch.float32], ids=["state-f64", "state-f32"])
def test_running_stats_large_mean_mixed_batches(backend, state):
    # SPEC 2.2: mean 1e4, std 1, 1e5 samples in batches of mixed sizes (3000 under the interpreter).
    rng = np.random.default_rng(0)
    n, sizes_ = (
        (3000, [1, 7, 500, 1492]) if interpreted(backend) else (100_000, [1, 7, 300, 4096, 2, 999, 31])
    )
    data = 1e4 + rng.standard_normal((n, 3))
    rs = ops.RunningStats((3,), device=DEVICE, dtype=state, backend=backend)
    start, i = 0, 0
    while start < n:
        size = sizes_[i % len(sizes_)]
        rs.update(torch.from_numpy(data[start : start + size]).float().to(DEVICE))
        start, i = start + size, i + 1
    seen = data.astype(np.float32).astype(np.float64)  # the batches were fed as fp32
    assert rs.count == n and rs.mean.dtype == state
    np.testing.assert_allclose(to_np(rs.mean), seen.mean(0), rtol=RUNNING_STATS["mean_rtol"])
    np.testing.assert_allclose(to_np(rs.var), seen.var(0), rtol=RUNNING_STATS["var_rtol"])


@pytest.mark.device
def test_welford_hard_cases(backend):
    mean, var = ops.batch_mean_var(torch.tensor([[2281.5], [2281.25]], device=DEVICE), backend=backend)
    assert var.item() == 0.015625 and mean.item() == 2281.375
    # Large mean, small spread, across tiles (97 rows) and row splits (500 rows).
    for rows, scale, offset in ((97, 0.01, 100.0), (500, 1.0, 1e4)):
        x = make((rows, 3), scale=scale, shift=offset)
        _, var = ops.batch_mean_var(x, backend=backend)
        np.testing.assert_allclose(to_np(var), to_np(x).var(0), **welford_hard(backend))
    _, var = ops.batch_mean_var(torch.full((40, 2), 1e7, device=DEVICE), backend=backend)
    assert torch.equal(var, torch.zeros(2, device=DEVICE))
    # The same through RunningStats, one sample at a time and in halves.
    rs = ops.RunningStats((1,), device=DEVICE, backend=backend)
    for v in (2281.5, 2281.25):
        rs.update(torch.tensor([[v]], dtype=torch.float64, device=DEVICE))
    assert rs.var.item() == 0.015625
    rs = ops.RunningStats((4,), device=DEVICE, backend=backend)
    x = make((1000, 4), scale=0.01, shift=100.0)
    rs.update(x[:500]), rs.update(x[500:])
    np.testing.assert_allclose(to_np(rs.var), to_np(x).var(0), **WELFORD_HARD_FUSED)  # fp64 state
    rs = ops.RunningStats((2,), device=DEVICE, backend=backend)
    rs.update(torch.full((10, 2), 1e7, device=DEVICE))
    assert rs.var.abs().max().item() == 0.0


@pytest.mark.device
@pytest.mark.parametrize("state", [torch.float64, torch.float32], ids=["state-f64", "state-f32"])
def test_running_stats_in_uneven_batches(backend, state):
    rs = ops.RunningStats((4, 9), device=DEVICE, dtype=state, backend=backend)
    data = make((76, 4, 9), scale=5.0, shift=-2.0)
    for chunk in data.split([5, 1, 70]):
        rs.update(chunk)
    ref_mean, ref_var = mean_var_ref(to_np(data))
    assert rs.count == 76 and rs.mean.shape == rs.var.shape == (4, 9)
    assert_matches(rs.mean, ref_mean, state)
    assert_matches(rs.var, ref_var, state)


@pytest.mark.device
def test_running_stats_merge_equals_one_pass_and_is_order_free(backend):
    a_data, b_data = make((37, 5, 3), torch.float64), make((11, 5, 3), torch.float64, shift=3.0)
    new = lambda: ops.RunningStats((5, 3), device=DEVICE, backend=backend)  # noqa: E731
    a, b, one = new(), new(), new()
    a.update(a_data[:20]), a.update(a_data[20:]), b.update(b_data)
    one.update(torch.cat([a_data, b_data]))
    for merged in (new().merge(a).merge(b), new().merge(b).merge(a)):
        assert merged.count == 48
        assert_matches(merged.mean, one.mean, torch.float64)
        assert_matches(merged.var, one.var, torch.float64)


def test_running_stats_state_dict_roundtrip_and_all_reduce_without_group(backend):
    rs = ops.RunningStats((2, 2), device=DEVICE, dtype=torch.float32, backend=backend)
    rs.update(make((9, 2, 2)))
    other = ops.RunningStats((2, 2), device=DEVICE, dtype=torch.float32, backend=backend)
    other.load_state_dict(rs.state_dict())
    assert other.count == 9
    assert torch.equal(other.mean, rs.mean) and torch.equal(other.var, rs.var)
    assert rs.all_reduce() is rs and rs.count == 9  # a single process: nothing to exchange


def test_running_stats_bad_input(backend):
    rs = ops.RunningStats((4, 3), backend=backend)
    with pytest.raises(ValueError, match=r"x of shape \(B, 4, 3\), got \(2, 3, 4\)"):
        rs.update(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="feature shape"):
        rs.merge(ops.RunningStats((3,)))
    with pytest.raises(ValueError, match="dtype"):
        ops.RunningStats((3,), dtype=torch.float16, backend=backend)
    with pytest.raises(ValueError, match="device"):
        rs.update(torch.zeros(2, 4, 3, device="meta"))
    with pytest.raises(ValueError, match="feature shape"):
        rs.load_state_dict(ops.RunningStats((3,)).state_dict())


# ---- stat_matching_loss --------------------------------------------------------------------------------


@pytest.mark.device
@pytest.mark.parametrize("shape", STAT_SHAPES, ids=str)
def test_stat_matching_shapes(backend, shape):
    _check_stat_matching(backend, make(shape), torch.float32)


@pytest.mark.device
@pytest.mark.parametrize("backend, dtype", backend_dtypes(), indirect=["backend"])
@pytest.mark.parametrize("shape, layout", DTYPE_SHAPES)
def test_stat_matching_dtypes_and_layouts(backend, dtype, shape, layout):
    x = make(shape, dtype, layout)
    _check_stat_matching(backend, x, dtype, x.numel())


@pytest.mark.device
def test_stat_matching_zero_norm_has_zero_gradient(backend):
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], device=DEVICE, requires_grad=True)  # mean (2, 4), var (1, 4)
    mu, var = torch.tensor([2.0, 4.0], device=DEVICE), torch.tensor([1.0, 1.0], device=DEVICE)
    loss = ops.stat_matching_loss(x, mu, var, backend=backend)
    loss.backward()
    ref_loss, ref_grad = stat_matching_ref(to_np(x), to_np(mu), to_np(var))
    assert loss.item() == 3.0 and ref_loss == 3.0
    assert torch.isfinite(x.grad).all()
    assert_matches(x.grad, ref_grad, torch.float32)


@pytest.mark.device
def test_stat_matching_zero_when_matched(backend):
    x = make((6, 4, 5)).requires_grad_()
    mean, var = ops.batch_mean_var(x.detach(), backend=backend)
    loss = ops.stat_matching_loss(x, mean, var, backend=backend)
    assert_matches(loss, 0.0, torch.float32)
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.device
def test_stat_matching_module_strided_fp64_targets_deterministic(backend):
    x = make((40, 90))[:, ::3].requires_grad_()
    mu = torch.randn(30, dtype=torch.float64, device=DEVICE)
    var = torch.rand(30, dtype=torch.float64, device=DEVICE)
    loss = ops.StatMatchingLoss(mu, var, backend=backend)(x)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_grad = stat_matching_ref(to_np(x), to_np(mu), to_np(var))
    assert_matches(loss, ref_loss, torch.float32)
    assert_matches(grad, ref_grad, torch.float32)
    again = ops.stat_matching_loss(x, mu, var, backend=backend)  # the functional form, a second time
    (grad_again,) = torch.autograd.grad(again, x)
    assert torch.equal(loss, again) and torch.equal(grad, grad_again)


@pytest.mark.parametrize("backend", FP64_BACKENDS, indirect=True)
def test_stats_gradcheck_fp64(backend):
    x = make((5, 3, 4), torch.float64).requires_grad_()
    mu, var = make((3, 4), torch.float64), make((3, 4), torch.float64).abs()
    assert torch.autograd.gradcheck(lambda t: ops.stat_matching_loss(t, mu, var, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.batch_mean_var(t, backend=backend), (x,))


@pytest.mark.parametrize("backend", FP64_BACKENDS, indirect=True)
def test_stat_matching_gradcheck_of_the_fused_op_fp64(backend):
    # The raw op (not only the public wrapper) has a correct autograd formula.
    x = make((6, 5), torch.float64).requires_grad_()
    zeros, ones = (
        torch.zeros(5, dtype=torch.float64, device=DEVICE),
        torch.ones(5, dtype=torch.float64, device=DEVICE),
    )
    fn = backend_module(backend).stat_matching
    assert torch.autograd.gradcheck(lambda t: fn(t, zeros, ones), (x,))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ops.stat_matching_loss(torch.zeros(2, 3, 4), torch.zeros(4, 3), torch.zeros(3, 4)),
            r"mean of shape \(3, 4\) \(x's feature shape\), got \(4, 3\)",
        ),
        (lambda: ops.stat_matching_loss(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2)), "var"),
        (
            lambda: ops.stat_matching_loss(torch.zeros(2, 3), torch.zeros(3, device="meta"), torch.zeros(3)),
            "same device",
        ),
        (lambda: ops.batch_mean_var(torch.zeros(0, 3)), r"B >= 1"),
    ],
    ids=["mean-shape", "var-shape", "device", "empty"],
)
def test_stat_matching_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- the kernels behind the public ops -------------------------------------------------------------


@pytest.mark.device
@pytest.mark.parametrize("backend", [EXT], indirect=True)
@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: torch.ops.invcoss.batch_mean_var(make((3,))),
            r"batch_mean_var: expected x of shape \(N, F\)",
        ),
        (
            lambda: torch.ops.invcoss.stat_matching(make((3, 4)), make((5,)), make((4,))),
            r"stat_matching: expected mean of shape \(4,\)",
        ),
        (
            lambda: torch.ops.invcoss.welford_update(make((3, 4)), 0, make((4,), torch.float16), make((4,))),
            "both fp32 or both fp64",
        ),
    ],
    ids=["cols-rank", "stat-shape", "state-dtype"],
)
def test_stats_kernel_argument_checks(backend, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def _state():
    return make((7,), torch.float64), make((7,), torch.float64).abs()


OPCHECK_CASES = [
    (EXT, "batch_mean_var", lambda: (make((9, 7)).requires_grad_(),)),
    (EXT, "batch_mean_var_backward", lambda: (make((9, 7)), make((7,)), make((7,)), make((7,)))),
    (EXT, "welford_update", lambda: (make((9, 7)), 4, *_state())),
    (EXT, "stat_matching", lambda: (make((9, 7)).requires_grad_(), make((7,)), make((7,)).abs())),
    ("triton", "batch_mean_var", lambda: (make((9, 7)).requires_grad_(),)),
    (
        "triton",
        "batch_mean_var_backward",
        lambda: (make((9, 7)), make((7,)), make((7,)), make((7,)), torch.ones(2, device=DEVICE)),
    ),
    ("triton", "welford_update", lambda: (make((9, 7)), 4, *_state())),
    ("triton", "stat_matching", lambda: (make((9, 7)).requires_grad_(), make((7,)), make((7,)).abs())),
]


@opcheck_cases(OPCHECK_CASES)
def test_stats_opcheck(backend, name, args):
    opcheck(backend, name, args())


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_stats_identical_with_1_and_2_threads(backend):
    def run():
        g = torch.Generator().manual_seed(3)
        f = (torch.randn(70, 4000, generator=g) + 3).requires_grad_()
        loss = ops.stat_matching_loss(f, torch.zeros(4000), torch.ones(4000), backend="cpu")
        loss.backward()
        state = (
            torch.randn(4000, generator=g, dtype=torch.float64),
            torch.rand(4000, generator=g, dtype=torch.float64),
        )
        welford = backend_module("cpu", "cpu").welford_update(f.detach(), 11, *state)
        # Three row chunks, merged in order, and a short last column group.
        tall = (torch.randn(2100, 150, generator=g) * 3 + 7).requires_grad_()
        tall_loss = ops.stat_matching_loss(tall, torch.zeros(150), torch.ones(150), backend="cpu")
        tall_loss.backward()
        return [loss, f.grad, *ops.batch_mean_var(f.detach(), backend="cpu"), *welford, tall_loss, tall.grad]

    assert_same_bits_with_1_and_2_threads(run)
