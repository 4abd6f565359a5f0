"""Total variation (Eq. 8), 2D and 3D: eager reference, torch.compile, and the fused backends."""

FAMILIES = ("tv",)


def test_tv(bench_row, run_case):
    row = run_case(*bench_row)
    assert row.median_ms > 0
