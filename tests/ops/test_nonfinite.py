"""The policy for bad values and empty input (README "Bad input"), the same on every backend.

Losses let a NaN or inf through (no loss hides a broken batch as 0); RunningStats and RepulsivePool
never fold one in silently (an error by default, or the rows skipped and counted); reference
statistics are checked where they enter; an empty batch is an error for a loss and changes nothing
in a running state; every argument error names the argument.
"""

import pytest
import torch

from invcoss import ops
from tests.ops.backends import DEVICE, make
from tests.ops.tolerances import assert_matches

# The Triton interpreter runs the kernels in numpy, which warns about the NaNs these tests plant.
pytestmark = [
    pytest.mark.device,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
NAN, INF = float("nan"), float("inf")


# ---- losses: a NaN or inf comes out ------------------------------------------------------------------


def test_stat_matching_propagates_nan(backend):
    x = make((4, 5, 6))
    x[1, 2, 3] = NAN
    x.requires_grad_()
    zeros, ones = torch.zeros(5, 6, device=DEVICE), torch.ones(5, 6, device=DEVICE)
    loss = ops.stat_matching_loss(x, zeros, ones, backend=backend)
    loss.backward()
    assert loss.isnan()
    assert x.grad.isnan().any()


def test_stat_matching_exact_match_is_zero_with_zero_gradient(backend):
    # The special case that must stay: ||0|| = 0 with a zero (not NaN) gradient.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=DEVICE, requires_grad=True)
    mean, var = torch.tensor([2.0, 3.0], device=DEVICE), torch.tensor([1.0, 1.0], device=DEVICE)
    loss = ops.stat_matching_loss(x, mean, var, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(2, 1, 3, 4, 4), (2, 3, 5, 5)], ids=["3d", "2d"])
def test_total_variation_propagates_nan(backend, shape):
    x = make(shape)
    x.view(-1)[7] = NAN
    assert ops.total_variation(x, reduction="none", backend=backend)[0].isnan()


def test_repulsive_propagates_nan(backend):
    h, pool = make((3, 8)), make((5, 8))
    h[0, 0] = NAN
    assert ops.repulsive_cosine_loss(h, pool, backend=backend).isnan()


# ---- RunningStats: rejected (raised on read) or skipped --------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_running_stats_raises_when_read_after_a_nonfinite_batch(backend, bad):
    rs = ops.RunningStats((3, 4), device=DEVICE, backend=backend)
    rs.update(make((5, 3, 4)))
    rs.check()  # a clean state passes
    x = make((6, 3, 4))
    x[2, 1, 3] = bad
    rs.update(x)  # no host read here
    rs.update(make((4, 3, 4)))  # the NaN stays in the state through later batches
    readers = {
        "mean": lambda: rs.mean,
        "var": lambda: rs.var,
        "m2": lambda: rs.m2,
        "state_dict": rs.state_dict,
        "check": rs.check,
        "merge": lambda: ops.RunningStats((3, 4), device=DEVICE).merge(rs),
    }
    for name, read in readers.items():
        with pytest.raises(
            ValueError, match=r"non-finite values in 1 of 12 features \(first: feature \(1, 3\)\)"
        ):
            read()
        assert name  # (the loop names the reader in a failure's traceback)


def test_running_stats_check_after_each_update_finds_the_batch(backend):
    rs = ops.RunningStats((4,), device=DEVICE, backend=backend)
    batches = [make((3, 4)) for _ in range(4)]
    batches[2][0, 1] = NAN
    failed_at = None
    for i, b in enumerate(batches):
        rs.update(b)
        try:
            rs.check()
        except ValueError:
            failed_at = i
            break
    assert failed_at == 2


def test_running_stats_skip_leaves_out_nonfinite_samples(backend):
    data = make((14, 2, 3))
    bad_rows = [1, 6, 7, 13]
    dirty = data.clone()
    dirty[1, 0, 0], dirty[6, 1, 2], dirty[7, 0, 1], dirty[13, 1, 1] = NAN, INF, -INF, NAN
    keep = [i for i in range(14) if i not in bad_rows]
    rs = ops.RunningStats((2, 3), device=DEVICE, backend=backend, nonfinite="skip")
    rs.update(dirty[:8])
    rs.update(dirty[8:])
    rs.update(dirty[6:8])  # every row bad: nothing changes
    clean = ops.RunningStats((2, 3), device=DEVICE, backend=backend)
    clean.update(data[keep][:5])
    clean.update(data[keep][5:])
    assert (rs.count, rs.skipped) == (len(keep), len(bad_rows) + 2)
    assert_matches(rs.mean, clean.mean, torch.float64)
    assert_matches(rs.var, clean.var, torch.float64)


def test_running_stats_load_state_dict_checks_the_state():
    rs = ops.RunningStats((3,))
    rs.update(torch.randn(4, 3))
    state = rs.state_dict()
    state["m2"] = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"RunningStats.load_state_dict.*negative or non-finite value"):
        ops.RunningStats((3,)).load_state_dict(state)
    state = rs.state_dict()
    state["mean"][1] = NAN
    with pytest.raises(ValueError, match=r"mean holds 1 non-finite value of 3 \(first at index \(1,\)"):
        ops.RunningStats((3,)).load_state_dict(state)
    state = rs.state_dict()
    del state["skipped"]  # written before skipped existed
    other = ops.RunningStats((3,))
    other.load_state_dict(state)
    assert (other.count, other.skipped) == (4, 0)


# ---- RepulsivePool.push: rejected or skipped, before anything is stored ---------------------------------


def test_pool_push_rejects_nonfinite_rows_and_stores_nothing(backend):
    pool = ops.RepulsivePool(8, 4, device=DEVICE, backend=backend)
    pool.push(make((2, 4)))
    before = (pool.features().clone(), pool.gram.clone(), pool.pushes)
    feats = make((5, 4))
    feats[1, 2], feats[3, 0] = NAN, INF
    feats[4] = 1e20  # finite, but its fp32 norm overflows: no unit vector to store
    with pytest.raises(ValueError, match=r"3 of 5 rows of features hold a NaN or inf.*rows 1, 3, 4; nothing"):
        pool.push(feats)
    assert torch.equal(pool.features(), before[0]) and torch.equal(pool.gram, before[1])
    assert pool.pushes == before[2] and len(pool) == 2
    assert torch.isfinite(pool.loss(make((3, 4))))


def test_pool_push_skip_stores_the_finite_rows(backend):
    first, feats = make((2, 4)), make((5, 4))
    feats[0, 1], feats[3, 3] = -INF, NAN
    pool = ops.RepulsivePool(8, 4, device=DEVICE, backend=backend, nonfinite="skip")
    pool.push(first)
    pool.push(feats)
    pool.push(feats[3:4])  # every row bad: nothing changes
    clean = ops.RepulsivePool(8, 4, device=DEVICE, backend=backend)
    clean.push(first)
    clean.push(feats[[1, 2, 4]])
    assert (len(pool), pool.skipped) == (5, 3)
    assert torch.equal(pool.features(), clean.features())
    h = make((3, 4))
    assert_matches(pool.loss(h), clean.loss(h), torch.float32)
    restored = ops.RepulsivePool(8, 4, device=DEVICE, backend=backend, nonfinite="skip")
    restored.load_state_dict(pool.state_dict())
    assert restored.skipped == 3


def test_pool_load_state_dict_rejects_nonfinite_rows():
    pool = ops.RepulsivePool(4, 2, backend="torch")
    state = {"features": torch.tensor([[1.0, NAN]]), "capacity": torch.tensor(4), "pushes": torch.tensor(1)}
    with pytest.raises(ValueError, match=r"state\['features'\] holds a NaN or inf"):
        pool.load_state_dict(state)


# ---- reference statistics: checked where they enter --------------------------------------------------


@pytest.mark.parametrize(
    "mean, var, match",
    [
        (
            [0.0, 0.0, 0.0],
            [1.0, -1e-3, 2.0],
            r"variance holds 1 negative or non-finite value of 3 \(first at index \(1,\)",
        ),
        ([0.0, 0.0, 0.0], [1.0, NAN, INF], r"variance holds 2 negative or non-finite values of 3"),
        ([0.0, INF, 0.0], [1.0, 1.0, 1.0], r"mean holds 1 non-finite value of 3"),
    ],
    ids=["negative-var", "nonfinite-var", "nonfinite-mean"],
)
def test_stat_matching_module_checks_its_statistics_once(mean, var, match):
    mean, var = torch.tensor(mean, device=DEVICE), torch.tensor(var, device=DEVICE)
    with pytest.raises(ValueError, match="StatMatchingLoss: the " + match):
        ops.StatMatchingLoss(mean, var, backend="torch")


def test_zero_variance_is_a_valid_reference():
    loss = ops.StatMatchingLoss(torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE), backend="torch")
    assert loss(torch.ones(3, 2, device=DEVICE)).item() == 0.0


def test_reference_check_names_the_layer_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"^block 7: the variance holds 1 .*index \(0, 1\): -1.0\)"):
        ops.check_reference_stats(torch.zeros(2, 2), torch.tensor([[1.0, -1.0], [1.0, 1.0]]), layer="block 7")
    with pytest.raises(
        ValueError, match=r"block 1: mean and var must have the same shape, got \(2,\) and \(3,\)"
    ):
        ops.check_reference_stats(torch.zeros(2), torch.ones(3), layer="block 1")
    with pytest.raises(TypeError, match="var to be a torch.Tensor"):
        ops.check_reference_stats(torch.zeros(2), [1.0, 1.0])
    ops.check_reference_stats(torch.zeros(2, device="meta"), torch.zeros(2, device="meta"))  # no values


# ---- empty input ------------------------------------------------------------------------------------------


EMPTY_LOSSES = {
    "tv-batch": (lambda b: ops.total_variation(torch.zeros(0, 1, 4, 4, device=DEVICE), backend=b), "x"),
    "tv-axis": (
        lambda b: ops.total_variation(torch.zeros(2, 1, 0, 4, device=DEVICE), reduction="sum", backend=b),
        "x",
    ),
    "tv-none": (
        lambda b: ops.total_variation(torch.zeros(0, 1, 4, 4, device=DEVICE), reduction="none", backend=b),
        "x",
    ),
    "batch_mean_var": (lambda b: ops.batch_mean_var(torch.zeros(3, 0, device=DEVICE), backend=b), "x"),
    "stat_matching": (
        lambda b: ops.stat_matching_loss(
            torch.zeros(0, 3, device=DEVICE),
            torch.zeros(3, device=DEVICE),
            torch.ones(3, device=DEVICE),
            backend=b,
        ),
        "x",
    ),
    "repulsive": (
        lambda b: ops.repulsive_cosine_loss(
            torch.zeros(0, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE), backend=b
        ),
        "h",
    ),
    "pool-loss": (
        lambda b: ops.RepulsivePool(4, 3, device=DEVICE, backend=b).loss(torch.zeros(0, 3, device=DEVICE)),
        "h",
    ),
}


@pytest.mark.parametrize("case", list(EMPTY_LOSSES))
def test_an_empty_batch_is_an_error_for_every_loss(backend, case):
    call, name = EMPTY_LOSSES[case]
    with pytest.raises(ValueError, match=rf"expects {name} of shape .*, got \("):
        call(backend)


def test_an_empty_batch_changes_no_running_state(backend):
    rs = ops.RunningStats((3,), device=DEVICE, backend=backend)
    rs.update(torch.zeros(0, 3, device=DEVICE))
    assert rs.count == 0 and torch.equal(rs.mean, torch.zeros(3, dtype=torch.float64, device=DEVICE))
    pool = ops.RepulsivePool(4, 3, device=DEVICE, backend=backend)
    pool.push(torch.zeros(0, 3, device=DEVICE))
    assert len(pool) == 0 and pool.pushes == 0
    h = make((2, 3)).requires_grad_()
    loss = pool.loss(h)  # the empty pool: 0 with a zero gradient
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


# ---- argument errors name the argument ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.RunningStats((10, -1)), ValueError, r"feature_shape of sizes >= 1, got \(10, -1\)"),
        (lambda: ops.RunningStats((0,)), ValueError, r"feature_shape of sizes >= 1"),
        (lambda: ops.RunningStats(5), TypeError, r"feature_shape to be a sequence of ints, got int"),
        (
            lambda: ops.RunningStats((2.5,)),
            TypeError,
            r"feature_shape to be a sequence of ints, got \(2.5,\)",
        ),
        (
            lambda: ops.RunningStats((3,), nonfinite="ignore"),
            ValueError,
            r"nonfinite in \('raise', 'skip'\), got 'ignore'",
        ),
        (lambda: ops.RepulsivePool(2.5, 3), TypeError, r"capacity to be an int, got float"),
        (lambda: ops.RepulsivePool(4, 0), ValueError, r"dim >= 1, got 0"),
        (lambda: ops.RepulsivePool(4, 3, eps=0.0), ValueError, r"eps to be a finite number > 0, got 0.0"),
        (lambda: ops.RepulsivePool(4, 3, rebuild_every=0), ValueError, r"rebuild_every >= 1, got 0"),
        (
            lambda: ops.RepulsivePool(4, 3, gram_dtype=torch.float16),
            ValueError,
            r"gram_dtype torch.float32 or",
        ),
        (lambda: ops.RepulsivePool(4, 3, nonfinite=None), ValueError, r"nonfinite in"),
        (
            lambda: ops.repulsive_cosine_loss(torch.ones(2, 3), torch.ones(2, 3), eps=float("nan")),
            ValueError,
            r"repulsive_cosine_loss expects eps to be a finite number > 0, got nan",
        ),
        (
            lambda: ops.total_variation(torch.ones(1, 1, 3, 3), weights=(1.0, -0.5)),
            ValueError,
            r"weights that are finite and >= 0, got \(1.0, -0.5\)",
        ),
        (
            lambda: ops.RepulsivePool(4, 3).push(torch.ones(2, 4)),
            ValueError,
            r"RepulsivePool.push expects features of shape \(B, 3\), got \(2, 4\)",
        ),
    ],
    ids=lambda v: None if callable(v) or isinstance(v, type) else "",
)
def test_argument_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_statistics_file_is_checked_when_loaded(tmp_path):
    from invcoss.feature_stats import FeatureStats, load_feature_stats, save_feature_stats

    var = [torch.ones(3, 4), torch.ones(3, 4)]
    var[1][2, 0] = -0.25
    stats = FeatureStats(
        mean=[torch.zeros(3, 4), torch.zeros(3, 4)], var=var, preset="p", config_hash="h", modality="ct",
        input_size=(4, 8, 8), count=10, dtype="float32",
    )  # fmt: skip
    path = save_feature_stats(stats, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"s.safetensors, block 1: the variance holds 1 .*\(2, 0\): -0.25"):
        load_feature_stats(path)


def test_the_inversion_checks_its_targets_once():
    from invcoss.inversion.engine import _stat_targets
    from invcoss.models import create_model

    model = create_model("vit_nano", img_size_2d=32)
    shape = (model.config.num_patches(2) + 1, model.config.embed_dim)
    pairs = [(torch.zeros(shape), torch.ones(shape)) for _ in range(model.config.depth)]
    assert len(_stat_targets(pairs, model, "xray")) == model.config.depth
    pairs[2] = (torch.zeros(shape), torch.full(shape, NAN))
    with pytest.raises(ValueError, match=r"the statistics of block 2: the variance holds"):
        _stat_targets(pairs, model, "xray")


# ---- the same under torch.compile ---------------------------------------------------------------------


def _all_losses(backend, x, feats, h, pool):
    mean, var = torch.zeros(feats.shape[1:], device=DEVICE), torch.ones(feats.shape[1:], device=DEVICE)
    tv = ops.total_variation(x, reduction="none", backend=backend)
    sm = ops.stat_matching_loss(feats, mean, var, backend=backend)
    rep = ops.repulsive_cosine_loss(h, pool, backend=backend)
    return torch.stack([tv[0], tv[1], sm, rep])


def _check_compiled_policy(backend: str, compiler: str) -> None:
    x, feats, h, pool = make((2, 1, 3, 4, 4)), make((4, 2, 3)), make((3, 5)), make((4, 5))
    x[1, 0, 2, 1, 1], feats[2, 1, 0], h[1, 4] = NAN, INF, NAN
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _all_losses(backend, *a), fullgraph=True, backend=compiler)
    out = compiled(x, feats, h, pool)
    assert torch.isfinite(out[0]) and out[1:].isnan().all()  # sample 0 of x is clean
    # fullgraph=True: Dynamo reports the error raised while tracing as Unsupported, with its message.
    with pytest.raises(
        (ValueError, torch._dynamo.exc.Unsupported), match=r"expects x .* got \(0, 1, 3, 4, 4\)"
    ):
        compiled(x[:0], feats, h, pool)


def test_compiled_losses_follow_the_same_policy(backend):
    # The fused ops are opaque nodes: aot_eager traces the graph inductor would get, quickly.
    _check_compiled_policy(backend, "aot_eager")


@pytest.mark.slow
def test_inductor_keeps_the_nans_of_the_torch_backend():
    # Inductor generates the torch backend's code itself, where a fast-math rewrite could drop a NaN.
    _check_compiled_policy("torch", "inductor")
