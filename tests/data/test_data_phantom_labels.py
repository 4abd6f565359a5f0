"""Anatomy labels of the phantoms: deterministic, balanced, on the preprocessing's windows, visible."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from invcoss.data import Preprocessor, Volume, get_config, write_phantoms
from invcoss.data.phantoms import (
    PHANTOM_LABELS,
    _window_fractions,
    _xray,
    phantom_label_rows,
    phantom_labels,
)


@pytest.mark.parametrize(
    ("modality", "size", "count"), [("ct", (24, 48, 48), 8), ("mri", (48, 32, 32), 6), ("xray", (32, 32), 20)]
)
def test_labels_are_deterministic_and_balanced(modality, size, count):
    labels = [phantom_labels(modality, 3, i, size) for i in range(count)]
    assert labels[:2] == [phantom_labels(modality, 3, i, size) for i in range(2)]
    counts = Counter(label for file in labels for label in file)
    assert set(counts) == set(PHANTOM_LABELS[modality])
    # Neither class below a quarter of the samples (measured: CT 38%, MRI 40%, X-ray 44% on 20 files).
    assert min(counts.values()) >= 0.25 * sum(counts.values()), counts
    if modality != "xray":  # one label per window the preprocessing cuts
        pre = Preprocessor(get_config(modality, "paper"))
        spacing = (2.5, 1.6, 1.6) if modality == "ct" else (1.5, 1.25, 1.25)
        depth = round(size[0] * spacing[0]) if modality == "ct" else size[0]
        assert all(len(file) == len(pre.windows.positions(depth)) for file in labels)


def test_window_fractions_follow_the_preprocessing_geometry():
    # A volume whose slices are 1 where a per-slice flag is set: the mean of each preprocessed
    # window is the fraction of flagged slices in it (up to interpolation at the two edges).
    flags = np.zeros(40, dtype=bool)
    flags[9:23] = True
    config = get_config("ct", "quick", size=(16, 4, 4), a_min=None, a_max=None)
    volume = Volume(np.repeat(flags.astype(np.float32), 16).reshape(40, 4, 4), (2.5, 1.0, 1.0), np.eye(4))
    means = [float(s.array.mean()) for s in Preprocessor(config)(volume)]
    fractions = _window_fractions(flags, 2.5, config)
    assert len(means) == len(fractions) == 7  # 100 slices at 1 mm, windows of 24 every 12
    assert np.allclose(means, fractions, atol=0.06), (means, fractions)
    mri = get_config("mri", "quick", size=(16, 4, 4))  # no resampling: windows of 16 every 8
    assert _window_fractions(flags, 1.5, mri) == [7 / 16, 14 / 16, 7 / 16, 0.0]


def test_xray_label_is_the_visible_level_of_the_lung_bases():
    # Lungs are dark on the radiograph: with low bases the band at 64-75% of the height is darker.
    low, high = [], []
    for i in range(8):
        img, anatomy = _xray(0, i, (64, 64))
        band = float(img[0, 41:48].mean())
        # The label reads the generator's draws without projecting: the same as the full phantom's.
        assert phantom_labels("xray", 0, i, (64, 64)) == [
            "low_lung_bases" if anatomy["lung_bottom"] < -0.55 else "high_lung_bases"
        ]
        (low if anatomy["lung_bottom"] < -0.55 else high).append(band)
    assert low and high and np.mean(low) < np.mean(high) - 0.01


def test_label_rows_name_the_written_files_and_errors(tmp_path):
    files = write_phantoms(tmp_path, "ct", 2, seed=1, size=(24, 48, 48))
    rows = phantom_label_rows(tmp_path, "ct", 2, seed=1, size=(24, 48, 48))
    assert sorted({p for p, _, _ in rows}) == files
    assert [k for p, k, _ in rows if p == files[1]] == [0, 1, 2, 3]
    assert [label for _, _, label in rows] == phantom_labels("ct", 1, 0, (24, 48, 48)) + phantom_labels(
        "ct", 1, 1, (24, 48, 48)
    )
    with pytest.raises(ValueError, match="phantom labels exist for ct, mri, xray, got 'pathology'"):
        phantom_labels("pathology")
    with pytest.raises(ValueError, match="config is for mri, not ct"):
        phantom_labels("ct", config=get_config("mri"))
