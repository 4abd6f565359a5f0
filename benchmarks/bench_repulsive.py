"""Repulsive cosine loss (Eq. 5): the direct path and RepulsivePool's Gram path."""

FAMILIES = ("repulsive_direct", "repulsive_pool")


def test_repulsive(bench_row, run_case):
    row = run_case(*bench_row)
    assert row.median_ms > 0
