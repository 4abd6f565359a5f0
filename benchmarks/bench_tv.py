"""Total variation (Eq. 8), 2D and 3D: eager reference, torch.compile, and the fused backends."""

FAMILY = "tv"


def test_tv(bench_row):
    bench_row.assert_matches_reference()
    bench_row.time()
