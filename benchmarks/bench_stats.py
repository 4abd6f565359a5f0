"""Welford statistics (Eq. 9) and the stat-matching loss (Eq. 3) on ViT block features."""

FAMILY = "stats"


def test_stats(bench_row):
    bench_row.assert_matches_reference()
    bench_row.time()
