"""Preprocessing transforms and profiles against formulas and numpy float64."""

from __future__ import annotations

import os

import numpy as np
import pytest
from nibabel.testing import data_path

from invcoss.data import (
    Compose,
    FillNonFinite,
    GridPatches,
    IntensityWindow,
    Preprocessor,
    ReplicateChannels,
    Resample,
    Resize,
    SlidingWindows,
    ToGrey,
    Volume,
    ZScore,
    get_config,
    read_nifti,
    window_starts,
    write_nifti,
    write_phantoms,
)


def test_ct_window_maps_hu_range_onto_minus_one_one():
    hu = np.array([-5000.0, -1025.0, -1024.0, -512.0, 0.0, 512.0, 1024.0, 1025.0, 3071.0])
    out = IntensityWindow(a_min=-1024, a_max=1024)(hu)
    np.testing.assert_allclose(out, [-1, -1, -1, -0.5, 0, 0.5, 1, 1, 1], atol=1e-7)
    assert out.dtype == np.float32
    unclipped = IntensityWindow(-1024, 1024, clip=False)(np.array([-2048.0, 2048.0]))
    np.testing.assert_allclose(unclipped, [-2.0, 2.0])
    with pytest.raises(ValueError, match="a_max > a_min"):
        IntensityWindow(10, 10)


def test_sliding_windows_of_a_100_slice_volume():
    vol = np.broadcast_to(np.arange(100, dtype=np.float32)[:, None, None], (100, 3, 2)).copy()
    wins = SlidingWindows(24, 12)(vol)
    assert SlidingWindows(24, 12).positions(100) == [0, 12, 24, 36, 48, 60, 72]
    assert len(wins) == 7  # floor((100 - 24) / 12) + 1
    for start, w in zip(range(0, 73, 12), wins):
        assert w.shape == (24, 3, 2)
        np.testing.assert_array_equal(w[:, 0, 0], np.arange(start, start + 24))
    # MRI: 16 every 8 -> floor((100 - 16) / 8) + 1 = 11 windows, the last at 80.
    assert window_starts(100, 16, 8) == list(range(0, 81, 8))
    # cover_end adds one window flush with the end when slices 96..99 would be left out.
    assert window_starts(100, 24, 12, cover_end=True) == [0, 12, 24, 36, 48, 60, 72, 76]
    assert window_starts(96, 24, 12, cover_end=True) == [0, 12, 24, 36, 48, 60, 72]


def test_short_volume_gives_one_padded_window():
    vol = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32) + 5
    (w,) = SlidingWindows(24, 12)(vol)
    assert w.shape == (24, 2, 2)
    np.testing.assert_array_equal(w[:10, 0, 0], np.arange(10) + 5)
    np.testing.assert_array_equal(w[10:], 5.0)  # padded with the volume's minimum


@pytest.mark.parametrize(
    "shape, spacing",
    [((37, 20, 30), (2.5, 0.7, 1.3)), ((12, 64, 64), (5.0, 0.6, 0.6)), ((40, 9, 11), (0.5, 3.0, 1.0))],
)
def test_resampling_preserves_physical_extent(shape, spacing):
    """Extent (voxels times spacing) is unchanged; spacing is 1 mm to within half a voxel over the extent."""
    d = (np.arange(shape[0]) + 0.5) * spacing[0]  # mm of each slice centre from the inferior edge
    array = np.broadcast_to(d[:, None, None], shape).astype(np.float32)
    vol = Volume(array, spacing, np.eye(4))
    out = Resample((1.0, 1.0, 1.0))(vol)
    np.testing.assert_allclose(out.extent, np.multiply(shape, spacing), rtol=1e-6)
    expected_shape = tuple(int(round(n * s)) for n, s in zip(shape, spacing))
    assert out.array.shape == expected_shape
    for n_new, s_new in zip(out.array.shape, out.spacing):
        assert abs(s_new - 1.0) <= 0.5 / n_new + 1e-9
    # Linear interpolation reproduces a linear function of position at every interior voxel.
    centres = (np.arange(out.array.shape[0]) + 0.5) * out.spacing[0]
    inside = (centres > d[0]) & (centres < d[-1])
    np.testing.assert_allclose(out.array[inside, 0, 0], centres[inside], rtol=1e-5, atol=1e-4)


def test_resample_of_nibabel_image_keeps_extent():
    vol = read_nifti(os.path.join(data_path, "anatomical.nii"))
    out = Resample()(vol)
    assert out.array.shape == (50, 82, 66)
    np.testing.assert_allclose(out.extent, vol.extent)


def test_zscore_against_numpy():
    x = np.random.default_rng(0).normal(300.0, 40.0, size=(6, 7, 8)).astype(np.float32)
    z = ZScore()(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(z, (x64 - x64.mean()) / x64.std(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ZScore()(np.full((2, 2), 3.0)), 0.0)


def test_fill_non_finite():
    x = np.array([[np.nan, 2.0], [np.inf, -np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(FillNonFinite()(x), [[2.0, 2.0], [2.0, 2.0]])


def test_resize_and_channels():
    img = np.random.default_rng(1).random((1, 512, 512), dtype=np.float32)
    out = Compose([Resize((224, 224)), ReplicateChannels(3)])(img)
    assert out.shape == (3, 224, 224)
    np.testing.assert_array_equal(out[0], out[2])
    # Antialiased downsampling keeps the mean of a random image.
    assert abs(float(out.mean()) - float(img.mean())) < 1e-3
    rgb = np.stack([np.zeros((4, 4)), np.ones((4, 4)), np.full((4, 4), 0.5)]).astype(np.float32)
    np.testing.assert_allclose(ToGrey()(rgb), 0.5)
    assert Resize((16, 96, 96))(np.zeros((24, 192, 192), np.float32)).shape == (16, 96, 96)
    with pytest.raises(ValueError, match="expects 1 or 3 channels, got 2"):
        ReplicateChannels(3)(np.zeros((2, 4, 4), np.float32))


def test_resizing_a_narrow_tall_image_stays_within_input_and_output_memory():
    """A 6-pixel-wide strip 65535 tall went through a (3, 65535, 224) intermediate (176 MB)."""
    import torch
    import torch.nn.functional as F

    small = np.random.default_rng(2).random((3, 2000, 6), dtype=np.float32)
    expected = F.interpolate(
        torch.from_numpy(small)[None], size=(112, 112), mode="bilinear", align_corners=False, antialias=True
    )[0].numpy()
    np.testing.assert_allclose(Resize((112, 112))(small), expected, atol=1e-6)
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("measures the peak resident memory through Linux's /proc/self/clear_refs")

    def status_mb(field: str) -> float:
        with open("/proc/self/status") as f:
            return int(f.read().split(field + ":")[1].split()[0]) / 1024

    strip = np.full((3, 65535, 6), 0.5, np.float32)  # 4.7 MB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts at what is resident now
    before = status_mb("VmRSS")
    out = Resize((224, 224))(strip)
    assert status_mb("VmHWM") - before < 40, status_mb("VmHWM") - before
    np.testing.assert_allclose(out, 0.5, atol=1e-4)


def test_grid_patches_positions_and_content():
    tile = np.random.default_rng(2).random((3, 1100, 1200), dtype=np.float32)
    g = GridPatches(512)
    assert g.positions(1100, 1200) == [(0, 0), (0, 512), (512, 0), (512, 512)]
    patches = g(tile)
    np.testing.assert_array_equal(patches[3], tile[:, 512:1024, 512:1024])
    assert g.positions(300, 700) == [(0, 0)]  # a short axis is taken whole


@pytest.mark.parametrize(
    "modality, profile, shape",
    [
        ("ct", "paper", (1, 16, 192, 192)),
        ("ct", "quick", (1, 16, 96, 96)),
        ("mri", "paper", (1, 16, 192, 192)),
        ("xray", "paper", (3, 224, 224)),
        ("xray", "quick", (3, 112, 112)),
        ("pathology", "paper", (3, 224, 224)),
    ],
)
def test_profiles(modality, profile, shape):
    cfg = get_config(modality, profile)
    assert cfg.sample_shape == shape
    assert cfg.digest() == get_config(modality, profile).digest()


def test_paper_profile_values():
    ct, mri = get_config("ct"), get_config("mri")
    assert (ct.spacing, ct.window, ct.stride, ct.a_min, ct.a_max) == (
        (1.0, 1.0, 1.0),
        24,
        12,
        -1024.0,
        1024.0,
    )
    assert (mri.window, mri.stride, mri.zscore, mri.spacing) == (16, 8, True, None)
    assert get_config("pathology").patch == 512
    assert get_config("ct", size=(8, 64, 64)).digest() != ct.digest()


def test_get_config_errors():
    with pytest.raises(ValueError, match="modality must be one of ct, mri, xray, pathology, got 'pet'"):
        get_config("pet")
    with pytest.raises(ValueError, match="profile must be one of paper, quick, got 'fast'"):
        get_config("ct", "fast")
    with pytest.raises(ValueError, match="size for ct must have 3 entries"):
        get_config("ct", size=(96, 96))
    with pytest.raises(ValueError, match="unknown field"):
        get_config("ct", depth=3)


def test_ct_pipeline_on_a_100_slice_volume(tmp_path):
    """100 slices at 1 mm: 7 windows of 24 every 12, each resized to 16 slices, HU mapped into [-1, 1]."""
    hu = np.linspace(-1500, 1500, 100, dtype=np.float32)[:, None, None] * np.ones((1, 40, 50), np.float32)
    path = write_nifti(tmp_path / "ramp.nii.gz", hu, (1.0, 1.0, 1.0))
    pre = Preprocessor(get_config("ct", "quick"))
    samples = pre(path)
    assert pre.count(path) == len(samples) == 7
    assert [s.position for s in samples] == [(s,) for s in range(0, 73, 12)]
    for s in samples:
        assert s.array.shape == (1, 16, 96, 96) and s.array.dtype == np.float32
        assert -1.0 <= s.array.min() and s.array.max() <= 1.0
        np.testing.assert_allclose(s.spacing, (1.5, 40 / 96, 50 / 96))
    # Window 3 covers slices 36..59: its centre slice is the windowed HU of the ramp there.
    centre = IntensityWindow()(np.linspace(-1500, 1500, 100)[36:60]).mean()
    assert abs(float(samples[3].array.mean()) - float(centre)) < 1e-3


def test_header_counts_match_processing(tmp_path):
    ct = write_phantoms(tmp_path / "ct", "ct", 2, size=(18, 40, 40), spacing=(2.7, 2.0, 2.0))
    mri = write_phantoms(tmp_path / "mri", "mri", 1, size=(40, 32, 32))
    for modality, paths in (("ct", ct), ("mri", mri)):
        pre = Preprocessor(get_config(modality, "quick"))
        for p in paths:
            assert pre.count(p) == len(pre(p))
    pre = Preprocessor(get_config("ct", "quick"))
    ex4d = os.path.join(data_path, "example4d.nii.gz")
    assert pre.count(ex4d) == len(pre(ex4d)) == 3  # 24 slices at 2.2 mm -> 53 slices -> 3 windows


def test_nan_voxels_are_filled(tmp_path):
    path = os.path.join(data_path, "resampled_anat_moved.nii")
    assert np.isnan(read_nifti(path).array).any()
    samples = Preprocessor(get_config("mri", "quick", window=3, stride=3))(path)
    assert all(np.isfinite(s.array).all() for s in samples)


def test_xray_and_pathology_pipelines(tmp_path):
    (xr,) = write_phantoms(tmp_path, "xray", 1, size=(300, 260))
    (s,) = Preprocessor(get_config("xray", "quick"))(xr)
    assert s.array.shape == (3, 112, 112)
    np.testing.assert_array_equal(s.array[0], s.array[1])

    (tile,) = write_phantoms(tmp_path, "pathology", 1, size=(1100, 1030))
    pre = Preprocessor(get_config("pathology"))
    samples = pre(tile)
    assert pre.count(tile) == len(samples) == 4
    assert [s.position for s in samples] == [(0, 0), (0, 512), (512, 0), (512, 512)]
    assert all(s.array.shape == (3, 224, 224) for s in samples)
    pre2 = Preprocessor(get_config("pathology", max_patches=2))
    chosen = pre2(tile)
    assert len(chosen) == 2 and [c.position for c in chosen] == pre2.positions(tile)
