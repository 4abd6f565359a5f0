"""The inversion step (Stage 1's inner loop): reference ops, fused ops, the default and compiled step.

One benchmark per profile: it times every step variant (:func:`invcoss.benchmark.step_variants`:
the plain fp32 eager step on the reference and on the fused ops, the device's default step and, on
CPU, the compiled one) round-robin in the same run (see :func:`invcoss.benchmark.time_inversion`)
and puts steps/s, samples/h, compile time and the ratio to the reference into ``extra_info``; the
session writes them with the op tables. Every row's first step must give the reference's losses
within its precision. CPU: the reduced profiles; CUDA: the paper's (``benchmarks/inversion_step.py``
is the same measurement without pytest).
"""

import torch

from invcoss import benchmark as bm

FAMILY = "inversion"


def test_inversion_step(profile_name, benchmark, request, inversion_rows):
    device = torch.device(request.config.getoption("--bench-device"))
    variants = bm.INVERSION.variants(device)
    steps = max(3, request.config.getoption("--bench-rounds"))
    rows: list[dict] = []
    benchmark.pedantic(
        lambda: rows.extend(
            bm.time_inversion(bm.INVERSION_PROFILES[profile_name], device, variants, steps, warmup=2)
        ),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(
        {
            f"{r['backend']}_{k}": r[k]
            for r in rows
            for k in ("steps_per_s", "samples_per_h", "compile_s", "ratio")
        }
    )
    inversion_rows.extend(rows)
    reference = rows[0]
    for r in rows[1:]:
        dtype = torch.bfloat16 if r["step"]["precision"] == "bf16" else torch.float32
        bm.assert_agrees(r["losses"], reference["losses"], dtype, f"{profile_name} {r['backend']}")
