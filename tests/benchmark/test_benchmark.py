"""The benchmark harness: the spec table, agreement with the reference, rows, the guard's logic.

Nothing here asserts a time: the tests check what the benchmarks compute (every provider the
reference's value, the minimum work of each op, the ratios and tables built from given times) and
the guard's pass/fail decision on synthetic measurements.
"""

import math

import pytest
import torch

from invcoss import benchmark as bm
from invcoss import ops
from invcoss.benchmark import guard
from invcoss.inversion.config import InversionConfig
from invcoss.ops.moments import chan_merge

CPU = torch.device("cpu")
TINY = bm.tiny_cases()
# The fused backends that run on CPU tensors here: the extension's cpu backend, and Triton through
# the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
FUSED = [b for b in ("cpu", "triton") if b in ops.available_backends()]


# ---- the spec table ---------------------------------------------------------------------------------


def test_the_table_has_every_op_family_and_the_inversion_step():
    assert set(bm.FAMILIES) == {"tv", "stats", "repulsive", "inversion"}
    assert {name: family.name for name, (family, _) in bm.OPS.items()} == {
        "tv": "tv",
        "stat_matching": "stats",
        "welford": "stats",
        "repulsive_direct": "repulsive",
        "repulsive_pool": "repulsive",
    }
    assert [c.op for c in TINY] == list(bm.OPS)  # one tiny case per op


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_every_op_has_inputs_reference_fused_callables_and_work(case):
    inputs = bm.make_inputs(case, CPU, torch.float32)
    again = bm.make_inputs(case, CPU, torch.float32)
    assert inputs and all(torch.equal(inputs[k], again[k]) for k in inputs)  # seeded
    arg = case.spec.arg(inputs)
    assert callable(case.spec.reference(inputs)) and callable(case.spec.fused(inputs, "torch"))
    for mode in case.modes:
        nbytes, flops = bm.work(case, mode, 4)
        assert nbytes >= arg.numel() * 4  # every op reads its argument at least once
        assert (flops is not None) == (case.family == "repulsive")


def test_inversion_family_reference_and_backends():
    family = bm.FAMILIES["inversion"]
    assert family.backends(CPU)[0] == family.reference_backend == "torch"
    assert family.backends(CPU)[1:] == bm.kernel_backends(CPU)
    assert set(family.profiles_for(CPU)) <= set(family.profiles)
    assert set(family.profiles_for("cuda")) == {"3d-paper", "2d-paper"}


def test_a_case_takes_its_modes_from_its_op_and_rejects_an_unknown_op():
    assert bm.Case("welford", (4, 5)).modes == ("fwd",)
    assert bm.Case("tv", (1, 1, 4, 4)).modes == bm.MODES
    assert bm.Case("tv", (1, 1, 4, 4), modes=("fwd",)).modes == ("fwd",)
    with pytest.raises(ValueError, match="Case expects op in .*got 'softmax'"):
        bm.Case("softmax", (2, 3))


def test_work_counts():
    # TV forward+backward: x read in forward, x read again and the gradient written in backward.
    assert bm.work(bm.Case("tv", (2, 3, 4, 5)), "fwd+bwd", 4) == (3 * 120 * 4, None)
    assert bm.work(bm.Case("tv", (2, 3, 4, 5)), "fwd", 2) == (120 * 2, None)
    assert bm.work(bm.Case("stat_matching", (2, 3, 4)), "fwd+bwd", 4) == (3 * 24 * 4, None)
    assert bm.work(bm.Case("welford", (2, 3)), "fwd", 2) == (6 * 2, None)
    # The Gram path: h (B, D) and G (D, D, fp32) read; 2 B D^2 flops, the gradient reuses G h^.
    assert bm.work(bm.Case("repulsive_pool", (2, 100, 8)), "fwd", 4) == (2 * 8 * 4 + 64 * 4, 2.0 * 2 * 8 * 8)
    assert bm.work(bm.Case("repulsive_pool", (2, 100, 8)), "fwd+bwd", 4) == (
        3 * 2 * 8 * 4 + 2 * 64 * 4,
        2.0 * 2 * 8 * 8,
    )
    # The direct path: h and the pool read (twice with backward, plus the gradient written).
    assert bm.work(bm.Case("repulsive_direct", (2, 100, 8)), "fwd", 2) == (102 * 8 * 2, 2.0 * 2 * 100 * 8)
    assert bm.work(bm.Case("repulsive_direct", (2, 100, 8)), "fwd+bwd", 2) == (
        (2 * 102 * 8 + 2 * 8) * 2,
        4.0 * 2 * 100 * 8,
    )


# ---- every provider computes the reference's value ---------------------------------------------------

ROWS = [(c, m, p) for c in TINY for m in c.modes for p in FUSED]


@pytest.mark.parametrize("case, mode, provider", ROWS, ids=lambda v: getattr(v, "name", v))
def test_every_provider_computes_the_reference_value(case, mode, provider):
    inputs = bm.make_inputs(case, CPU, torch.float32)
    expected = bm.build(case, "eager", mode, inputs)()
    value = bm.build(case, provider, mode, inputs)()
    bm.assert_agrees(value, expected, torch.float32, f"{case.name} {mode} {provider}")


def test_the_welford_reference_is_chan_merge_of_var_mean_into_a_running_state():
    case = bm.Case("welford", (6, 3, 4))
    inputs = bm.make_inputs(case, CPU, torch.float32)
    mean, m2 = bm.build(case, "eager", "fwd", inputs)()
    x = inputs["x"].reshape(6, -1).double()
    both = torch.cat([x, x])  # the state holds the batch once, the call folds it in again
    torch.testing.assert_close(mean.double(), both.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2.double(), both.var(0, correction=0) * 12, rtol=1e-5, atol=1e-5)
    # options reach the callables: an fp64 state
    fp64 = bm.Case("welford", (6, 3, 4), options=(("state_dtype", torch.float64),))
    assert bm.build(fp64, "eager", "fwd", inputs)()[0].dtype == torch.float64
    assert bm.build(fp64, "cpu" if "cpu" in FUSED else "torch", "fwd", inputs)()[1].dtype == torch.float64


def test_chan_merge_of_two_halves_equals_one_pass_and_an_empty_side_is_the_other():
    x = torch.randn(10, 3, dtype=torch.float64) * 3 + 1e4
    a, b = x[:4], x[4:]
    n, mean, m2 = chan_merge(
        4, a.mean(0), a.var(0, correction=0) * 4, 6, b.mean(0), b.var(0, correction=0) * 6
    )
    assert n == 10
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(m2, x.var(0, correction=0) * 10, rtol=1e-10, atol=0)
    empty = torch.zeros(3, dtype=torch.float64)
    mean_a, m2_a = a.mean(0), a.var(0, correction=0) * 4
    for merged in (
        chan_merge(0, empty, empty, 4, mean_a, m2_a),
        chan_merge(4, mean_a, m2_a, 0, empty, empty),
    ):
        assert merged[0] == 4 and merged[1] is mean_a and merged[2] is m2_a


def test_agreement_fails_on_a_wrong_value_and_passes_on_rounding():
    ref = torch.tensor([1.0, -2.0, 3.0])
    bm.assert_agrees(ref * (1 + 1e-6), ref, torch.float32, "rounding")
    with pytest.raises(
        AssertionError,
        match=r"wrong: differs from the eager reference by 1.00e-02 .* more than the 1e-04 allowed in float32",
    ):
        bm.assert_agrees(ref * 1.01, ref, torch.float32, "wrong")
    bm.assert_agrees(ref * 1.01, ref, torch.bfloat16, "bf16 allows 2e-2")
    # tuples: the worst part decides; a zero reference counts absolutely; NaN never agrees
    assert bm.relative_error((ref, ref * 2), (ref, ref)) == pytest.approx(1.0)
    assert bm.relative_error(torch.tensor([3e-5]), torch.zeros(1)) == pytest.approx(3e-5)
    assert math.isnan(bm.relative_error((ref.clone().fill_(math.nan), ref), (ref, ref)))
    with pytest.raises(AssertionError):
        bm.assert_agrees(torch.full((3,), math.nan), ref, torch.float32, "nan")
    # dicts of numbers (the inversion step's losses) compare term by term
    assert bm.relative_error({"a": 1.0, "b": 1e-3}, {"a": 1.0, "b": 1.1e-3}) == pytest.approx(1 / 11)
    with pytest.raises(ValueError, match="one structure"):
        bm.relative_error({"a": 1.0}, {"b": 1.0})


# ---- rows, ratios and tables --------------------------------------------------------------------------


def test_rows_ratios_and_rates_from_given_times():
    case = bm.Case("tv", (2, 1, 3, 8, 8))
    rows = [
        bm.make_row(case, p, "fwd+bwd", CPU, torch.float32, times)
        for p, times in (("eager", [4.0, 2.0, 3.0]), ("compile", [2.0, 1.0, 1.5]), ("cpu", [1.0, 0.5, 0.75]))
    ]
    bm.add_ratios(rows)
    assert [r.median_ms for r in rows] == [3.0, 1.5, 0.75]
    assert [r.ratio_eager for r in rows] == [1.0, 2.0, 4.0]
    assert [r.ratio_compile for r in rows] == [0.5, 1.0, 2.0]
    assert rows[2].nbytes == 3 * 384 * 4 and rows[2].gbps == pytest.approx(3 * 384 * 4 / 0.75 / 1e6)
    assert (rows[0].family, rows[0].shape) == ("tv", "2x1x3x8x8")  # the op, as the records name it
    md = bm.to_markdown(rows, "tiny", {"copy_gbps": 10.0, "bf16_tflops": 1.0})
    assert md.count("\n| tv[2x1x3x8x8] |") == 3 and "| 4.00 | 2.00 |" in md


def test_run_suite_measures_every_case_mode_and_provider():
    providers = ["eager", *FUSED]
    rows = bm.run_suite("cpu", cases=TINY, providers=providers, reps=2)
    expected = [(c.name, m, p) for c in TINY for m in c.modes for p in providers]
    assert [(r.case, r.mode, r.provider) for r in rows] == expected
    for r in rows:
        assert r.nbytes == bm.work(bm.Case(r.family, tuple(map(int, r.shape.split("x")))), r.mode, 4)[0]
        if r.provider == "eager":
            assert r.ratio_eager == 1.0


def test_measure_rows_stops_before_the_next_row():
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    rows = list(bm.measure_rows(TINY, ["eager"], CPU, [torch.float32], reps=1, stop=stop))
    assert [(r.case, r.mode) for r, _ in rows] == [(TINY[0].name, "fwd"), (TINY[0].name, "fwd+bwd")]


# ---- the CPU guard --------------------------------------------------------------------------------------


def _result(name: str, eager_s: float, fused_s: float) -> guard.GuardResult:
    row = next(r for r in guard.GUARD_ROWS if r.name == name)
    return guard.GuardResult(row, eager_s, fused_s, guard.THRESHOLDS[name])


def test_the_guard_has_one_row_per_threshold_on_the_spec_table():
    assert [r.name for r in guard.GUARD_ROWS] == list(guard.THRESHOLDS)
    assert {r.case.op for r in guard.GUARD_ROWS} == {"tv", "stat_matching", "welford", "repulsive_pool"}
    welford = next(r for r in guard.GUARD_ROWS if r.case.op == "welford")
    assert welford.mode == "fwd" and dict(welford.case.options) == {"state_dtype": torch.float64}


def test_the_guard_passes_at_its_threshold_and_fails_below():
    at = _result("stat_matching_loss", 2.0, 1.0)
    below = _result("stat_matching_loss", 1.99, 1.0)
    assert at.passed and not below.passed
    assert guard.failures([at, below]) == ["stat_matching_loss: 1.99x < 2.0x"]
    assert guard.table_line(at).endswith("|") and guard.table_line(below).endswith("| <")


def test_the_guard_rates_count_each_sides_work():
    r = _result("repulsive loss (RepulsivePool)", 2.0, 0.1)
    eager, fused = r.row.rates(r.eager_s, r.fused_s)
    b, p, d = 320, 16384, 768
    assert eager == pytest.approx(4.0 * b * p * d / 2.0 / 1e9)  # the direct formula
    assert fused == pytest.approx(2.0 * b * d * d / 0.1 / 1e9)  # the Gram path
    tv = next(r for r in guard.GUARD_ROWS if r.name == "total_variation 2D")
    nbytes = 3 * 32 * 3 * 224 * 224 * 4  # x read twice, the gradient written once
    assert tv.rates(1.0, 0.5) == pytest.approx((nbytes / 1e9, 2 * nbytes / 1e9))


@pytest.mark.parametrize(
    "args, slow, status",
    [([], True, 0), (["--guard"], False, 0), (["--guard"], True, 1)],
    ids=["report-only", "guard-pass", "guard-fail"],
)
def test_the_guard_exit_status(monkeypatch, capsys, args, slow, status):
    def fake(repeats: int):
        yield _result("total_variation 3D", 10.0, 1.0)
        yield _result("RunningStats.update", 1.0 if slow else 2.0, 1.0)

    monkeypatch.setattr(guard, "measure_guard", fake)
    monkeypatch.setattr(guard.ops, "available_backends", lambda: ["torch", "cpu"])
    assert guard.main(args) == status
    out, err = capsys.readouterr()
    assert out.count("\n| ") == 3  # the header and two rows
    assert ("below threshold: RunningStats.update: 1.00x < 1.5x" in err) == (status == 1)


def test_the_guard_fails_without_the_cpu_backend(monkeypatch, capsys):
    monkeypatch.setattr(guard.ops, "available_backends", lambda: ["torch"])
    assert guard.main(["--guard"]) == 1
    assert "the cpu backend is not available" in capsys.readouterr().err


# ---- the inversion step -------------------------------------------------------------------------------

TINY_INVERSION = bm.INVERSION_PROFILES["tiny"]


def test_inversion_step_is_the_engine_step_and_the_family_callables_agree():
    inv, step = bm.inversion_setup(TINY_INVERSION, "cpu", "torch")
    assert inv.config.batch_size == 2 and inv.pool.size == 2 * 96 > inv.pool.dim  # the Gram path
    first, second = step(), step()
    assert set(first) == {"task", "norm", "img", "rep", "total"}
    assert first["total"] != second["total"]  # the step updates the generator and the latents
    family = bm.FAMILIES["inversion"]
    assert family.reference(TINY_INVERSION, "cpu")() == first  # the same seed: the same first step
    for backend in family.backends(CPU)[1:]:  # the fused losses give the same values
        bm.assert_agrees(family.fused(TINY_INVERSION, "cpu", backend)(), first, torch.float32, backend)


def test_time_inversion_rows_and_table():
    backends = bm.INVERSION.backends(CPU)
    rows = bm.time_inversion(TINY_INVERSION, "cpu", backends, steps=2, warmup=1)
    assert [r["backend"] for r in rows] == backends
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert len(r["times_ms"]) == 2 and r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"])
        assert r["ratio"] == pytest.approx(rows[0]["median_ms"] / r["median_ms"])
        bm.assert_agrees(r["losses"], rows[0]["losses"], torch.float32, r["backend"])  # the first step
    md = bm.inversion_markdown(rows, "tiny")
    assert md.startswith("### tiny") and md.count("| tiny | vit_nano | 2 | 32x32 |") == len(backends)
    with pytest.raises(ValueError, match="backends must be distinct"):
        bm.time_inversion(TINY_INVERSION, "cpu", ["torch", "torch"])


def test_step_variant_rows_report_samples_per_hour_and_flop_utilisation():
    assert [v.name for v in bm.step_variants("cpu")] == ["reference", "fused", "default", "compiled"]
    assert [v.name for v in bm.step_variants("cuda")] == ["reference", "fused", "default"]  # compiled already
    paper = InversionConfig.from_profile("paper", "ct")
    assert bm.mean_steps_per_batch(paper) == (2000 + 9 * 500) / 10
    assert bm.mean_steps_per_batch(InversionConfig.from_profile("paper", "xray")) == 1000
    variants = bm.step_variants(CPU, compiled=False)
    rows = bm.time_inversion(TINY_INVERSION, "cpu", variants, steps=2, warmup=1, flops=True, bf16_tflops=2.0)
    assert [r["backend"] for r in rows] == ["reference", "fused", "default"]
    assert (
        rows[0]["step"]["memory_format"] == "contiguous"
        and rows[2]["step"]["memory_format"] == "channels_last"
    )
    config = bm.inversion_setup(TINY_INVERSION, "cpu", "torch")[0].config
    for r in rows:
        want = TINY_INVERSION.batch_size * 3.6e6 / (r["median_ms"] * bm.mean_steps_per_batch(config))
        assert r["samples_per_h"] == pytest.approx(want) and r["compile_s"] > 0
        assert r["compile_fallback"] is None
        assert r["flops"] == rows[0]["flops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 2.0)
        bm.assert_agrees(r["losses"], rows[0]["losses"], torch.float32, r["backend"])
    md = bm.inversion_markdown(rows)
    assert "| samples/h | compile s | x reference | TFLOP/s | % bf16 (MFU) |" in md
    assert "| default | cpu | fp32, channels-last |" in md


def test_inversion_verdicts_judge_the_default_row():
    from invcoss.benchmark.inversion import inversion_verdicts

    rows = [
        {"profile": "3d-paper", "variant": "reference", "device": "cuda:0", "ratio": 1.0},
        {"profile": "3d-paper", "variant": "default", "device": "cuda:0", "ratio": 2.4, "mfu": 0.30},
        {"profile": "2d-paper", "variant": "default", "device": "cuda:0", "ratio": 2.1, "mfu": 0.41},
        {"profile": "3d-reduced", "variant": "default", "device": "cpu", "ratio": 1.4},
    ]
    assert inversion_verdicts(rows) == [
        "- 3d-paper: default step 2.40x the reference loop (target >= 2.0x), 30% model FLOP "
        "utilisation (target >= 35%): missed",
        "- 2d-paper: default step 2.10x the reference loop (target >= 2.0x), 41% model FLOP "
        "utilisation (target >= 35%): met",
        "- 3d-reduced: default step 1.40x the reference loop (target >= 1.5x): missed",
    ]
    # A default row whose compiled step was set aside says so.
    eager = {"profile": "2d-paper", "variant": "default", "device": "cpu", "ratio": 1.6}
    eager["compile_fallback"] = "latent gradients off by 1 in norm (tolerance 0.0001)"
    assert inversion_verdicts([eager]) == [
        "- 2d-paper: default step 1.60x the reference loop (target >= 1.5x), run eagerly: the compiled "
        "step differed (latent gradients off by 1 in norm (tolerance 0.0001)): met"
    ]


@pytest.mark.parametrize(
    "case",
    [bm.Case("tv", (3, 2, 11, 13)), bm.Case("tv", (2, 1, 5, 7, 9)), bm.Case("stat_matching", (9, 5, 7)),
     bm.Case("repulsive_direct", (5, 40, 8)), bm.Case("repulsive_pool", (5, 40, 8)), bm.Case("welford", (4, 5, 8))],
    ids=lambda c: c.name,
)  # fmt: skip
def test_the_eager_reference_matches_the_float64_oracle(case):
    # The harness judges every provider against the eager reference; the float64 numpy formulation
    # of invcoss.benchmark.refs (the tests' oracle too) judges the eager reference.
    from invcoss.benchmark.specs import oracle_error

    err = oracle_error(case, bm.make_inputs(case, torch.device("cpu"), torch.float32))
    if case.family == "stats" and case.spec.name == "welford":
        assert err is None  # a running state, not a value: covered by tests/ops/test_stats.py
    else:
        assert err is not None and err < 1e-5, err
