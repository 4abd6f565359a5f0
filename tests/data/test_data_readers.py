"""Readers and writers: nibabel's own test images, phantom files, pictures, unreadable files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from PIL import Image

from invcoss.data import (
    ReadError,
    ct_phantom,
    nifti_geometry,
    read_nifti,
    read_picture,
    write_nifti,
    write_phantoms,
    write_png,
)

NIBABEL_3D = ["standard.nii.gz", "anatomical.nii", "reoriented_anat_moved.nii", "resampled_anat_moved.nii"]
NIBABEL_4D = ["example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz"]


def nib_file(name: str) -> str:
    return os.path.join(data_path, name)


def raw_frame(img, frame: int = 0) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float64)
    return data[..., frame] if data.ndim == 4 else data


@pytest.mark.parametrize("name", NIBABEL_3D + NIBABEL_4D)
def test_nifti_matches_file_in_world_coordinates(name):
    """Every voxel of the (D, H, W) array sits at the world position the file gives its value."""
    img = nib.load(nib_file(name))
    raw = raw_frame(img)
    vol = read_nifti(nib_file(name))
    assert vol.array.dtype == np.float32
    assert vol.array.shape == tuple(reversed(raw.shape))
    # Canonical: the W, H, D axes run towards R, A, S.
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    rng = np.random.default_rng(0)
    d, h, w = (rng.integers(0, n, size=50) for n in vol.array.shape)
    world = vol.affine @ np.stack([w, h, d, np.ones(50)])
    ijk = np.rint(np.linalg.inv(img.affine) @ world)[:3].astype(int)
    np.testing.assert_allclose(vol.array[d, h, w], raw[ijk[0], ijk[1], ijk[2]], rtol=1e-6)


@pytest.mark.parametrize(
    "name, shape, spacing",
    [
        ("standard.nii.gz", (7, 5, 4), (2.0, 3.0, 1.0)),
        ("anatomical.nii", (25, 41, 33), (2.0, 2.0, 2.0)),
        ("functional.nii", (3, 21, 17), (8.0, 4.0, 4.0)),
        ("example4d.nii.gz", (24, 96, 128), (2.2, 2.0, 2.0)),
    ],
)
def test_nifti_shape_and_spacing(name, shape, spacing):
    vol = read_nifti(nib_file(name))
    assert vol.array.shape == shape
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-5)
    np.testing.assert_allclose(vol.extent, np.multiply(shape, spacing), rtol=1e-5)
    geo_shape, geo_spacing = nifti_geometry(nib_file(name))
    assert geo_shape == shape
    np.testing.assert_allclose(geo_spacing, spacing, rtol=1e-5)


def test_nifti_flips_a_left_anterior_superior_file():
    """anatomical.nii is stored LAS: the canonical array is the stored one mirrored along x."""
    img = nib.load(nib_file("anatomical.nii"))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    raw = np.asarray(img.dataobj, dtype=np.float32)
    np.testing.assert_array_equal(read_nifti(nib_file("anatomical.nii")).array, raw[::-1].transpose(2, 1, 0))


def test_nifti_4d_frames():
    img = nib.load(nib_file("example4d.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    raw = np.asarray(img.dataobj, dtype=np.float32)
    for frame in (0, 1):
        np.testing.assert_array_equal(
            read_nifti(nib_file("example4d.nii.gz"), frame=frame).array,
            raw[::-1, :, :, frame].transpose(2, 1, 0),
        )
    with pytest.raises(ReadError, match="frame 2 out of range for 2"):
        read_nifti(nib_file("example4d.nii.gz"), frame=2)


def test_ct_phantom_file_roundtrip_and_orientation(tmp_path):
    size, spacing = (20, 48, 56), (3.0, 2.0, 1.5)
    (path,) = write_phantoms(tmp_path, "ct", 1, seed=3, size=size, spacing=spacing)
    vol = read_nifti(path)
    assert vol.array.shape == size
    np.testing.assert_allclose(vol.spacing, spacing)
    expected = np.round(ct_phantom(3, 0, size, spacing))
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.array.min() >= -1024 and vol.array.max() > 300  # air and bone in HU
    # The spine is posterior: bone voxels near the midline sit in the low-H (posterior) half.
    d, h, w = np.nonzero(vol.array[:, :, size[2] // 2 - 3 : size[2] // 2 + 3] > 200)
    assert h.mean() < size[1] / 2


def test_mri_phantom_file(tmp_path):
    (path,) = write_phantoms(tmp_path, "mri", 1, size=(12, 40, 36), spacing=(1.5, 1.0, 1.0))
    vol = read_nifti(path)
    assert vol.array.shape == (12, 40, 36) and vol.array.min() >= 0
    assert vol.spacing == (1.5, 1.0, 1.0)


def test_phantoms_are_deterministic(tmp_path):
    a = write_phantoms(tmp_path / "a", "ct", 2, seed=7, size=(8, 24, 24))
    b = write_phantoms(tmp_path / "b", "ct", 3, seed=7, size=(8, 24, 24))
    c = write_phantoms(tmp_path / "c", "ct", 1, seed=8, size=(8, 24, 24))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b[:2]]
    assert a[0].read_bytes() != c[0].read_bytes()
    pa = write_phantoms(tmp_path / "pa", "pathology", 1, seed=1, size=(64, 64))
    pb = write_phantoms(tmp_path / "pb", "pathology", 1, seed=1, size=(64, 64))
    assert pa[0].read_bytes() == pb[0].read_bytes()


@pytest.mark.parametrize("modality, channels", [("xray", 1), ("pathology", 3)])
def test_picture_phantom_files(tmp_path, modality, channels):
    (path,) = write_phantoms(tmp_path, modality, 1, size=(40, 50))
    pic = read_picture(path)
    assert pic.array.shape == (channels, 40, 50)
    assert 0.0 <= pic.array.min() and pic.array.max() <= 1.0


def test_write_nifti_roundtrip_float(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 6, 7)).astype(np.float32)
    for name in ("v.nii", "v.nii.gz"):
        v = read_nifti(write_nifti(tmp_path / name, a, (0.5, 1.25, 2.0)))
        np.testing.assert_array_equal(v.array, a)
        assert v.spacing == (0.5, 1.25, 2.0)
    with pytest.raises(ValueError, match=r"expects array of shape \(D, H, W\), got \(6, 7\)"):
        write_nifti(tmp_path / "x.nii", a[0], (1, 1, 1))


def test_pictures_of_every_mode(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_allclose(read_picture(tmp_path / "g.png").array[0], grey / 255.0, rtol=1e-6)

    g16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(read_picture(tmp_path / "g16.png").array[0], g16 / 65535.0, rtol=1e-6)

    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 7)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.tiff")
    np.testing.assert_allclose(
        read_picture(tmp_path / "c.tiff").array, rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6
    )

    rgba = np.concatenate([rgb, np.full_like(grey, 128)[..., None]], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert read_picture(tmp_path / "a.png").array.shape == (3, 3, 4)

    gx, gy = np.meshgrid(np.linspace(0, 255, 32), np.linspace(40, 200, 24))
    smooth = np.round(np.stack([gx, gy, np.full_like(gx, 90.0)], -1))
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "c.jpg", quality=95, subsampling=0)
    assert np.abs(read_picture(tmp_path / "c.jpg").array - smooth.transpose(2, 0, 1) / 255.0).max() < 0.03

    write_png(tmp_path / "w.png", np.full((2, 3), 0.5))
    assert read_picture(tmp_path / "w.png").array.shape == (1, 2, 3)


def test_unreadable_files_name_the_file(tmp_path):
    (good,) = write_phantoms(tmp_path, "ct", 1, size=(8, 24, 24))
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ReadError, match="truncated.nii.gz: cannot read voxel data"):
        read_nifti(truncated)

    short_header = tmp_path / "short.nii.gz"
    short_header.write_bytes(gzip.compress(b"\0" * 100))
    with pytest.raises(ReadError, match="short.nii.gz: cannot read NIfTI header"):
        read_nifti(short_header)

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ReadError, match="notes.txt: not a NIfTI file"):
        read_nifti(text)
    with pytest.raises(ReadError, match="notes.txt: not a picture file"):
        read_picture(text)

    fake_png = tmp_path / "fake.png"
    fake_png.write_text("not an image either")
    with pytest.raises(ReadError, match="fake.png: cannot decode image") as info:
        read_picture(fake_png)
    assert info.value.path == Path(fake_png)
