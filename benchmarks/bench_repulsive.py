"""Repulsive cosine loss (Eq. 5): the direct path and RepulsivePool's Gram path."""

FAMILY = "repulsive"


def test_repulsive(bench_row):
    bench_row.assert_matches_reference()
    bench_row.time()
