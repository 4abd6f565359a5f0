"""The inversion step (Stage 1's inner loop) with the fused ops against the reference ops.

One benchmark per profile: it times every backend round-robin in the same run (see
:func:`invcoss.benchmark.time_inversion`) and puts steps/s and the ratio to the reference into
``extra_info``; the session writes them with the op tables. Every backend's first step must give the
reference backend's losses. CPU: the reduced profiles; CUDA: the paper's
(``benchmarks/inversion_step.py`` is the same measurement without pytest).
"""

import torch

from invcoss import benchmark as bm

FAMILY = "inversion"


def test_inversion_step(profile_name, benchmark, request, inversion_rows):
    device = torch.device(request.config.getoption("--bench-device"))
    backends = bm.INVERSION.backends(device)
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
    reference = rows[0]
    for r in rows[1:]:
        bm.assert_agrees(r["losses"], reference["losses"], torch.float32, f"{profile_name} {r['backend']}")
