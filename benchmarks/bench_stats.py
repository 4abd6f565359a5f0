"""Welford statistics (Eq. 9) and the stat-matching loss (Eq. 3) on ViT block features."""

FAMILIES = ("stat_matching", "welford")


def test_stats(bench_row, run_case):
    row = run_case(*bench_row)
    assert row.median_ms > 0
