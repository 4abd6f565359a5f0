"""The inversion step (Stage 1's inner loop) with the fused ops against the reference ops.

One benchmark per profile: it times every backend round-robin in the same run (see
:func:`invcoss.benchmark.time_inversion`) and puts steps/s and the ratio to the reference into
``extra_info``; the session writes them with the op tables. CPU: the reduced profiles; CUDA: the
paper's (``benchmarks/inversion_step.py`` is the same measurement without pytest).
"""

import pytest
import torch

from invcoss import benchmark as bm


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "profile_name" in metafunc.fixturenames:
        device = metafunc.config.getoption("--bench-device")
        metafunc.parametrize("profile_name", bm.inversion_profiles_for(device))


def test_inversion_step(profile_name, benchmark, request, inversion_rows):
    device = torch.device(request.config.getoption("--bench-device"))
    backends = ["torch"] + bm.kernel_backends(device)
    steps = max(3, request.config.getoption("--bench-rounds"))
    rows: list[dict] = []
    benchmark.pedantic(
        lambda: rows.extend(bm.time_inversion(bm.INVERSION_PROFILES[profile_name], device, backends, steps)),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(
        {f"{r['backend']}_steps_per_s": r["steps_per_s"] for r in rows}
        | {f"{r['backend']}_ratio": r["ratio"] for r in rows}
    )
    inversion_rows.extend(rows)
    assert [r["backend"] for r in rows] == backends
    assert all(r["steps_per_s"] > 0 for r in rows)
