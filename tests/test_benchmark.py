"""The benchmark core: rows, ratios and tables on tiny cases (no timing is asserted)."""

import pytest
import torch

from invcoss import benchmark as bm

TINY = [
    bm.Case("tv", (2, 1, 3, 8, 8)),
    bm.Case("stat_matching", (4, 5, 8)),
    bm.Case("welford", (4, 5, 8), modes=("fwd",)),
    bm.Case("repulsive_direct", (3, 6, 4)),
    bm.Case("repulsive_pool", (3, 9, 4)),
]


def test_run_suite_rows_and_ratios():
    rows = bm.run_suite(
        "cpu",
        cases=TINY,
        providers=["eager"] + [p for p in ("cpu",) if p in bm.providers_for(torch.device("cpu"))],
        reps=2,
    )
    n_modes = sum(len(c.modes) for c in TINY)
    assert len(rows) == n_modes * len({r.provider for r in rows})
    for r in rows:
        assert r.median_ms > 0 and r.p20_ms <= r.p80_ms
        assert r.gbps is not None  # every op moves bytes; the repulsive losses also count flops
        assert (r.tflops is not None) == r.family.startswith("repulsive")
        if r.provider == "eager":
            assert r.ratio_eager == 1.0
    md = bm.to_markdown(rows, "tiny")
    assert md.count("\n| ") == len(rows) + 1


def test_every_provider_computes_the_same_loss():
    # The callables the benchmarks time compute the same numbers for every provider.
    for case in TINY:
        if case.family == "welford":
            continue  # the reference returns the merged state, RunningStats.update works in place
        inputs = bm.make_inputs(case, torch.device("cpu"), torch.float32)
        results = {
            p: bm.build(case, p, case.modes[-1], inputs)()
            for p in bm.providers_for(torch.device("cpu"))
            if p != "compile"
        }
        first = next(iter(results.values()))
        for p, out in results.items():
            torch.testing.assert_close(out, first, rtol=1e-4, atol=1e-5, msg=f"{case.name} {p}")


def test_work_counts():
    # TV forward+backward: x read in forward, x read again and the gradient written in backward.
    assert bm.work(bm.Case("tv", (2, 3, 4, 5)), "fwd+bwd", 4) == (3 * 120 * 4, None)
    assert bm.work(bm.Case("tv", (2, 3, 4, 5)), "fwd", 2) == (120 * 2, None)
    assert bm.work(bm.Case("welford", (2, 3)), "fwd", 2) == (6 * 2, None)
    # The Gram path: h (B, D) and G (D, D, fp32) read; 2 B D^2 flops, the gradient reuses G h^.
    assert bm.work(bm.Case("repulsive_pool", (2, 100, 8)), "fwd", 4) == (2 * 8 * 4 + 64 * 4, 2.0 * 2 * 8 * 8)
    assert bm.work(bm.Case("repulsive_pool", (2, 100, 8)), "fwd+bwd", 4)[1] == 2.0 * 2 * 8 * 8
    # The direct path: h and the pool read (twice with backward, plus the gradient written).
    assert bm.work(bm.Case("repulsive_direct", (2, 100, 8)), "fwd", 2) == (102 * 8 * 2, 2.0 * 2 * 100 * 8)
    assert bm.work(bm.Case("repulsive_direct", (2, 100, 8)), "fwd+bwd", 2) == (
        (2 * 102 * 8 + 2 * 8) * 2,
        4.0 * 2 * 100 * 8,
    )


TINY_INVERSION = bm.InversionProfile(
    "tiny",
    "xray",
    "vit_nano",
    2,
    (32, 32),
    "quick",
    (("generator_channels", (8, 8, 4)), ("latent_dim", 8)),
)


def test_inversion_step_is_the_engine_step_and_backends_agree():
    backends = ["torch"] + bm.kernel_backends("cpu")
    values = {}
    for backend in backends:
        inv, step = bm.inversion_setup(TINY_INVERSION, "cpu", backend)
        assert inv.config.batch_size == 2 and inv.pool.size == 2 * 96 > inv.pool.dim  # the Gram path
        first, second = step(), step()
        assert set(first) == {"task", "norm", "img", "rep", "total"}
        assert first["total"] != second["total"]  # the step updates the generator and the latents
        values[backend] = first
    for backend in backends[1:]:  # same seed, same model: the fused losses give the same values
        for k, v in values["torch"].items():
            assert abs(values[backend][k] - v) <= 1e-4 * max(1.0, abs(v)), (backend, k)


def test_time_inversion_rows_and_table():
    backends = ["torch"] + bm.kernel_backends("cpu")
    rows = bm.time_inversion(TINY_INVERSION, "cpu", backends, steps=2, warmup=1)
    assert [r["backend"] for r in rows] == backends
    assert rows[0]["ratio"] == 1.0 and all(r["ratio"] > 0 for r in rows)
    assert all(len(r["times_ms"]) == 2 and r["steps_per_s"] > 0 for r in rows)
    md = bm.inversion_markdown(rows, "tiny")
    assert md.startswith("### tiny") and md.count("| tiny | vit_nano | 2 | 32x32 |") == len(backends)
    with pytest.raises(ValueError, match="backends must be distinct"):
        bm.time_inversion(TINY_INVERSION, "cpu", ["torch", "torch"])
