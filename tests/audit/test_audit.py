"""The privacy audit flags planted copies of training samples and leaves unrelated data alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from invcoss.audit import (
    audit_summary,
    memorisation_audit,
    nearest_distances,
    save_closest_pairs,
    stats_audit,
)
from invcoss.data.phantoms import xray_phantom
from invcoss.data.transforms import resize_array
from invcoss.feature_stats import (
    MIN_COHORT_SOURCES,
    SmallCohortWarning,
    collect_feature_stats,
    load_feature_stats,
    save_feature_stats,
)
from invcoss.models import create_model


def _phantoms(seed: int, n: int) -> torch.Tensor:
    out = [
        np.repeat(resize_array(xray_phantom(seed, i, (64, 64)).astype(np.float32), (32, 32)), 3, 0)
        for i in range(n)
    ]
    return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32)
    return model, _phantoms(0, 16), _phantoms(1, 16)


def test_nearest_distances_match_numpy():
    g = torch.Generator().manual_seed(1)
    q, t = torch.randn(5, 7, generator=g), torch.randn(9, 7, generator=g)
    d, i = nearest_distances(q, t)
    ref = np.sqrt(((q.numpy()[:, None].astype(np.float64) - t.numpy()[None]) ** 2).mean(-1))
    np.testing.assert_allclose(d.numpy(), ref.min(1), rtol=1e-10)
    assert i.tolist() == ref.argmin(1).tolist()
    groups = torch.arange(5) % 3
    d2, i2 = nearest_distances(q, t[:5], groups, groups)
    assert all(int(groups[int(j)]) != int(groups[k]) for k, j in enumerate(i2))
    with pytest.raises(ValueError, match="queries"):
        nearest_distances(q, t[:, :3])


@pytest.mark.parametrize("heldout", [True, False])
def test_planted_copies_flagged_noise_not(setup, heldout, tmp_path):
    model, train, held = setup
    g = torch.Generator().manual_seed(0)
    copy = train[3:4]
    noised = (train[5:6] + 0.02 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    noise = torch.rand(4, 3, 32, 32, generator=g)
    syn = torch.cat([copy, noised, noise])
    spaces = memorisation_audit(model, syn, train, held if heldout else None)
    for name, s in spaces.items():
        assert s.flagged[:2].all(), name  # the copy and the noised copy
        assert not s.flagged[2:].any(), name  # unrelated noise
        assert int(s.nearest[0]) == 3 and int(s.nearest[1]) == 5
        assert float(s.synthetic[0]) == 0.0
    summary = audit_summary(spaces, 5.0, "held-out")
    assert summary["flagged_both"] == [0, 1]
    assert summary["pixels"]["score"] == pytest.approx(2 / 6)
    png = save_closest_pairs(tmp_path / "pairs.png", spaces["pixels"], syn, train, pairs=3)
    from PIL import Image

    im = np.asarray(Image.open(png))
    assert im.shape[:2] == (3 * 32 + 2 * 2, 2 * 32 + 2)
    # The closest pair is the exact copy: its two halves are identical.
    np.testing.assert_array_equal(im[:32, :32], im[:32, 34:])


def test_audit_bad_input(setup):
    model, train, held = setup
    with pytest.raises(ValueError, match="percentile"):
        memorisation_audit(model, train[:2], train, held, percentile=100)
    with pytest.raises(ValueError, match="one shape"):
        memorisation_audit(model, train[:2, :1], train, held)
    with pytest.raises(ValueError, match="reference distances"):
        memorisation_audit(model, train[:2], train, train_groups=[0] * len(train))


def test_stats_record_cohort_and_audit_small_cohort(setup, tmp_path):
    model, train, held = setup
    with pytest.warns(SmallCohortWarning, match=f"fewer than {MIN_COHORT_SOURCES}"):
        one = collect_feature_stats(model, train[:1], modality="xray", sources=1)
    path = save_feature_stats(one, tmp_path / "s.safetensors")
    assert load_feature_stats(path).sources == 1
    report = stats_audit(model, one, train[:1], held)
    assert report["below_minimum"] and report["train"]["min"] < 1e-6 and report["train_closer"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallCohortWarning)
        many = collect_feature_stats(model, train, modality="xray", sources=MIN_COHORT_SOURCES)
    report = stats_audit(model, many, train, held)
    assert not report["below_minimum"]
    # Sixteen members sit near sqrt(15/16) spreads from their mean, not on it.
    assert 0.4 < report["train"]["min"] and 0.7 < report["train"]["median"] < 1.0


def test_stats_file_without_sources_still_loads(setup, tmp_path):
    model, train, _ = setup
    with pytest.warns(SmallCohortWarning):
        stats = collect_feature_stats(model, train[:2], modality="xray")
    assert stats.sources is None  # a bare tensor: the sources are unknown
    path = save_feature_stats(stats, tmp_path / "old.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "sources" not in (f.metadata() or {})
    assert load_feature_stats(path, model).count == 2
