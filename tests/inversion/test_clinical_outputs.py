"""Outputs as a clinician reads them: the training data's spacing, radiological previews, MRI range."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from invcoss.data import get_config, open_dataset, preprocess, read_nifti, write_phantoms
from invcoss.data.summary import IntensityHistogram, data_spacings, spacing_summary
from invcoss.feature_stats import (
    DataSummaryWarning,
    collect_feature_stats,
    load_feature_stats,
    save_feature_stats,
)
from invcoss.inversion import Inverter
from invcoss.inversion.config import InversionConfig
from invcoss.inversion.files import write_preview
from invcoss.inversion.preview import GLYPHS
from invcoss.modality import INPUT_SPACES
from invcoss.models import create_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

SIZE = (16, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vit_nano", img_size_3d=SIZE)


def tiny(modality: str, **kw) -> InversionConfig:
    base = dict(
        modality=modality, batch_size=4, steps=1, warmup_steps=1, latent_dim=8,
        generator_channels=(8, 8, 4, 4),
    )  # fmt: skip
    return InversionConfig(**(base | kw))


# -- the data summary --------------------------------------------------------------------------------
def test_intensity_histogram_matches_numpy_and_merges():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20_000, generator=g) * 2 + 1
    b = torch.cat([torch.randn(10_000, generator=g) * 0.5, torch.tensor([7.5, float("nan"), float("inf")])])
    whole, left, right = IntensityHistogram(), IntensityHistogram(), IntensityHistogram()
    whole.update(torch.cat([a, b]))
    left.update(a)
    right.update(b)
    merged = left.merge(right).summary()
    s = whole.summary()
    assert s == merged
    finite = np.concatenate([a.numpy(), b[:-2].numpy()]).astype(np.float64)
    assert s.min == pytest.approx(finite.min(), abs=1e-4) and s.max == pytest.approx(finite.max(), abs=1e-4)
    assert s.count == finite.size and s.nonfinite == 2
    for q, v in s.percentiles.items():
        assert abs(v - np.percentile(finite, float(q))) < 1 / 256 + 1e-4, q
    assert IntensityHistogram().summary() is None


def test_spacing_summary_records_median_and_spread():
    s = spacing_summary([(1.0, 0.8, 0.8), (1.0, 0.8, 0.8), (3.0, 1.2, 0.7)])
    assert s.median == (1.0, 0.8, 0.8) and s.low == (1.0, 0.8, 0.7) and s.high == (3.0, 1.2, 0.8)
    assert s.mixed and s.samples == 3 and spacing_summary([]) is None
    with pytest.raises(ValueError, match="3 positive values"):
        spacing_summary([(1.0, 0.0, 1.0)])


@pytest.fixture(scope="module")
def ct_cache(tmp_path_factory):
    """A CT cache of two scans of different spacing: windows of 24 mm over 16 slices (1.5 mm), 96
    mm (scan 0) or 72 mm (scan 1) across over 32 pixels (3 or 2.25 mm)."""
    root = tmp_path_factory.mktemp("ctdata")
    write_phantoms(root / "a", "ct", 1, size=(10, 48, 48), spacing=(3.0, 2.0, 2.0))
    write_phantoms(root / "b", "ct", 1, size=(10, 48, 48), spacing=(3.0, 1.5, 1.5), seed=1)
    (root / "b" / "ct_0000.nii.gz").rename(root / "a" / "ct_0001.nii.gz")
    config = get_config("ct", "paper", size=SIZE)
    preprocess(root / "a", root / "cache", "ct", config=config)
    return root / "cache", root / "a", config


def test_stats_record_the_datas_spacing_from_a_cache_and_from_scans(tmp_path, model, ct_cache):
    cache, scans, config = ct_cache
    ds = open_dataset(cache)
    assert len({tuple(s["spacing"]) for s in ds.samples}) == 2  # mixed spacings
    stats = collect_feature_stats(model, ds, out=tmp_path / "s.safetensors")
    back = load_feature_stats(tmp_path / "s.safetensors", model)
    assert back.data == stats.data
    sp = back.data.spacing
    assert (
        sp.samples == len(ds)
        and sp.low == pytest.approx((1.5, 2.25, 2.25))
        and sp.high == pytest.approx((1.5, 3.0, 3.0))
    )
    expected = np.median(np.array([s["spacing"] for s in ds.samples]), axis=0)
    assert sp.median == pytest.approx(tuple(expected), abs=1e-4)
    values = torch.stack([ds[i] for i in range(len(ds))])
    assert back.data.intensity.min == pytest.approx(float(values.min()), abs=1e-4)
    assert back.data.intensity.max == pytest.approx(float(values.max()), abs=1e-4)
    # The same scans read as a folder: the spacings come from the headers, sample for sample.
    folder = open_dataset(scans, "ct", config=config)
    np.testing.assert_allclose(data_spacings(folder), [s["spacing"] for s in ds.samples], rtol=1e-12)
    assert collect_feature_stats(model, torch.rand(2, 1, *SIZE), modality="ct").data.spacing is None


def test_volumes_are_written_with_the_statistics_spacing_unless_the_user_gives_one(tmp_path, model, ct_cache):
    stats = collect_feature_stats(model, open_dataset(ct_cache[0]))
    median = stats.data.spacing.median
    run = Inverter(model, stats, tiny("ct"), backend="torch").run(4, tmp_path / "a")
    assert read_nifti(run.files[0]).spacing == pytest.approx(median, abs=1e-4)
    assert (
        run.manifest["spacing_mm"] == pytest.approx(list(median))
        and run.manifest["spacing_from"] == "statistics"
    )
    given = Inverter(model, stats, tiny("ct", spacing=(2.0, 1.0, 1.0)), backend="torch").run(
        4, tmp_path / "b"
    )
    assert read_nifti(given.files[0]).spacing == pytest.approx((2.0, 1.0, 1.0))
    assert given.manifest["spacing_from"] == "config"


def test_statistics_without_the_data_summary_keep_the_nominal_spacing_with_a_warning(tmp_path, model):
    stats = collect_feature_stats(model, torch.rand(4, 1, *SIZE) * 2 - 1, modality="mri")
    old = dataclasses.replace(stats, data=None)
    save_feature_stats(old, tmp_path / "old.safetensors")
    assert "data" not in _metadata(tmp_path / "old.safetensors")
    old = load_feature_stats(tmp_path / "old.safetensors", model)
    with pytest.warns(DataSummaryWarning, match="4\\*tanh"):
        inv = Inverter(model, old, tiny("mri"), backend="torch")
    assert inv.space == INPUT_SPACES["mri"]
    run = inv.run(4, tmp_path / "run")
    assert run.manifest["spacing_from"] == "phantoms" and "value_range" not in run.manifest["identity"]


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# -- MRI range ---------------------------------------------------------------------------------------
def test_mri_samples_span_the_range_of_the_statistics_data(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, *SIZE, generator=g).clamp(-1.5, 5.0)
    x[0, 0, 0, 0, 0] = 7.5  # z-scored scans reach 7 or more
    stats = collect_feature_stats(model, x, modality="mri")
    assert stats.data.intensity.max == 7.5 and stats.data.intensity.min == -1.5
    inv = Inverter(model, stats, tiny("mri", generator="pixels"), backend="torch")
    assert inv.space.value_range == (-7.5, 7.5) and "7.5*tanh" in inv.space.description
    images = inv.generate(4).images
    assert 4.0 < float(images.abs().max()) <= 7.5  # beyond the former 4*tanh, within the data's range
    run = inv.run(4, tmp_path / "mri")
    assert run.manifest["identity"]["value_range"] == [-7.5, 7.5] and "7.5*tanh" in run.manifest["intensity"]
    # CT keeps its fixed window whatever the data's range.
    assert (
        Inverter(model, collect_feature_stats(model, x, modality="ct"), tiny("ct")).space
        == INPUT_SPACES["ct"]
    )


# -- preview -----------------------------------------------------------------------------------------
def _preview(tmp_path, volume: np.ndarray, ndim: int, space) -> np.ndarray:
    p = tmp_path / "s.npy"
    np.save(p, volume.astype(np.float32))
    inv = SimpleNamespace(ndim=ndim, space=space)
    write_preview(tmp_path / "preview.png", inv, [p])
    with Image.open(tmp_path / "preview.png") as im:
        return np.asarray(im, dtype=np.float32) / 255.0


def test_preview_is_radiological_with_the_directions_marked(tmp_path):
    d, h, w = 8, 32, 32
    v = np.full(
        (1, d, h, w), -1.0
    )  # (C, D, H, W): D inferior->superior, H posterior->anterior, W left->right
    v[0, :, h - 8 :, :8] = 1.0  # anterior, on the patient's left (low W)
    v[0, :, :4, w // 2 - 2 : w // 2 + 2] = 0.0  # posterior midline (a spine)
    img = _preview(tmp_path, v, 3, INPUT_SPACES["ct"])
    band = 9  # a 5x7 letter with a margin each side, at tiles under 64 pixels
    assert img.shape == (h + 2 * band, w + 2 * band)
    tile = img[band : band + h, band : band + w]
    bright = np.argwhere(tile == 1.0)
    # Anterior up; the patient's left on the viewer's right.
    assert bright[:, 0].max() < 8 and bright[:, 1].min() >= w - 8 and len(bright) == 64
    spine = np.argwhere(np.isclose(tile, 0.5, atol=0.01))
    assert spine[:, 0].min() >= h - 4 and abs(spine[:, 1].mean() - (w - 1) / 2) < 0.01
    letters = {
        "A": img[1:8, band + (w - 5) // 2 :][:, :5],
        "P": img[band + h + 1 :][:7, band + (w - 5) // 2 :][:, :5],
    }
    letters["R"] = img[band + (h - 7) // 2 :][:7, (band - 5) // 2 :][:, :5]
    letters["L"] = img[band + (h - 7) // 2 :][:7, band + w + (band - 5) // 2 :][:, :5]
    for letter, pixels in letters.items():
        expected = np.array([[c == "#" for c in row] for row in GLYPHS[letter]])
        np.testing.assert_array_equal(pixels == 0.0, expected, err_msg=letter)


def test_2d_previews_show_images_as_stored_without_marks(tmp_path):
    a = np.zeros((3, 16, 16))
    a[:, :4, :4] = 1.0  # top left as stored
    img = _preview(tmp_path, a, 2, INPUT_SPACES["pathology"])
    assert img.shape == (16, 16, 3) and img[:4, :4].min() == 1.0 and img[4:, 4:].max() == 0.0
