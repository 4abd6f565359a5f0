"""DICOM input: series written here with pydicom, compared with the same volume as NIfTI and with
DICOM's own geometry formula (tests/data/dicom_files.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("pydicom")

from click.testing import CliRunner  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import JPEGLSLossless  # noqa: E402

from invcoss.cli import main  # noqa: E402
from invcoss.data import (  # noqa: E402
    DEFAULT_LIMITS,
    CachedDataset,
    FolderDataset,
    NoSamplesError,
    ReadError,
    ReadLimits,
    get_config,
    preprocess,
    read_nifti,
    write_nifti,
)
from invcoss.data.cache import find_sources  # noqa: E402
from invcoss.data.dicom import read_dicom_picture, read_dicom_series, scan_dicom  # noqa: E402
from tests.data.dicom_files import (  # noqa: E402
    lps_to_ras,
    multiframe,
    non_image,
    projection,
    slice_dataset,
    write,
    write_series,
)

K, R, C = 8, 16, 12  # slices, rows, columns
AXIAL = (1, 0, 0, 0, 1, 0)


def stored_values(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, (K, R, C)).astype(np.int16)


def only_series(folder: Path, limits: ReadLimits = DEFAULT_LIMITS):
    scan = scan_dicom(sorted(folder.rglob("*.dcm")), limits, 3)
    assert not scan.skipped, [str(e) for e in scan.skipped]
    assert len(scan.series) == 1
    return scan.series[0]


def test_axial_series_reads_as_the_same_volume_written_as_nifti(tmp_path):
    stored = stored_values()
    # DICOM's default axial: columns run to the patient's left (+x LPS), rows to posterior (+y LPS).
    # Placed so that voxel (0, 0, 0) of the canonical RAS volume lies at the origin.
    write_series(
        tmp_path / "dcm", stored, AXIAL, spacing=(0.5, 0.75), origin=(-(C - 1) * 0.75, -(R - 1) * 0.5, 0.0),
        slope=2.0, intercept=-1024.0, shuffle=3,
    )  # fmt: skip
    vol = read_dicom_series(only_series(tmp_path / "dcm"), DEFAULT_LIMITS)
    # Canonical: superior last, anterior last, right-to-left flipped to left-to-right.
    expected = stored[:, ::-1, ::-1].astype(np.float64) * 2.0 - 1024.0
    nifti = read_nifti(write_nifti(tmp_path / "same.nii.gz", expected.astype(np.float32), (2.0, 0.5, 0.75)))
    np.testing.assert_array_equal(vol.array, nifti.array)
    assert vol.spacing == nifti.spacing == (2.0, 0.5, 0.75)
    np.testing.assert_allclose(vol.affine, nifti.affine, atol=1e-9)


@pytest.mark.parametrize(
    "iop",
    [
        (0, 1, 0, 0, 0, -1),  # sagittal
        (1, 0, 0, 0, 0, -1),  # coronal
        (-1, 0, 0, 0, -1, 0),  # axial, flipped in plane
        (np.cos(0.3), np.sin(0.3), 0, -np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), -np.sin(0.2)),
    ],
    ids=["sagittal", "coronal", "flipped", "oblique"],
)
def test_every_voxel_lies_where_dicom_places_it(tmp_path, iop):
    stored = np.arange(K * R * C, dtype=np.int16).reshape(K, R, C)  # every value names its pixel
    origin, spacing, step = np.array([10.0, -20.0, 30.0]), (0.8, 1.1), 2.0
    write_series(tmp_path, stored, iop, spacing, np.full(K - 1, step), origin, shuffle=1)
    vol = read_dicom_series(only_series(tmp_path), DEFAULT_LIMITS)
    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    d, h, w = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    k, rest = np.divmod(vol.array.astype(np.int64), R * C)
    j, i = np.divmod(rest, C)
    # DICOM PS3.3 C.7.6.2.1.1: pixel (row j, column i) of slice k.
    lps = (
        origin
        + k[..., None] * step * normal
        + i[..., None] * spacing[1] * iop[:3]
        + j[..., None] * spacing[0] * iop[3:]
    )
    world = np.stack([w, h, d, np.ones_like(d)], -1) @ vol.affine.T
    np.testing.assert_allclose(world[..., :3], lps_to_ras(lps), atol=1e-6)
    # And the NIfTI reader gives the same array for the same voxels in the same place.
    affine = np.eye(4)
    affine[:3, :3] = np.stack([iop[:3] * spacing[1], iop[3:] * spacing[0], normal * step], 1)
    affine[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    nib.save(nib.Nifti1Image(stored.transpose(2, 1, 0).astype(np.float32), affine), tmp_path / "same.nii")
    nifti = read_nifti(tmp_path / "same.nii")
    np.testing.assert_array_equal(vol.array, nifti.array)
    np.testing.assert_allclose(vol.affine, nifti.affine, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, nifti.spacing, rtol=1e-6)


def test_multiframe_file_reads_as_the_same_series(tmp_path):
    stored = stored_values(1)
    write_series(
        tmp_path / "slices", stored, AXIAL, (0.5, 0.75), origin=(1.0, 2.0, 3.0), slope=0.5, intercept=-10
    )
    write(
        multiframe(stored, AXIAL, (0.5, 0.75), 2.0, (1.0, 2.0, 3.0), 0.5, -10),
        tmp_path / "enhanced" / "mf.dcm",
    )
    # A plain multi-frame file: one position, frames stepped by SpacingBetweenSlices along the normal.
    plain = slice_dataset(stored[0], (1.0, 2.0, 3.0), AXIAL, (0.5, 0.75), slope=0.5, intercept=-10)
    plain.NumberOfFrames, plain.SpacingBetweenSlices = K, 2.0
    plain.PixelData = stored.tobytes()
    write(plain, tmp_path / "plain" / "mf.dcm")
    a = read_dicom_series(only_series(tmp_path / "slices"), DEFAULT_LIMITS)
    for folder in ("enhanced", "plain"):
        b = read_dicom_series(only_series(tmp_path / folder), DEFAULT_LIMITS)
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.affine, b.affine)


def test_duplicate_copy_is_dropped_with_a_warning_and_clashing_slices_skip_the_series(tmp_path):
    paths = write_series(tmp_path / "dup", stored_values(), shuffle=None)
    (tmp_path / "dup" / "copy.dcm").write_bytes(paths[3].read_bytes())
    series = only_series(tmp_path / "dup")
    assert len(series.slices) == K and "duplicate" in series.warnings[0]
    write_series(tmp_path / "clash", stored_values(), shuffle=None)
    ds = slice_dataset(stored_values(2)[0], (0, 0, 4.0), AXIAL)  # another instance where slice 2 lies
    write(ds, tmp_path / "clash" / "other.dcm")
    scan = scan_dicom(sorted((tmp_path / "clash").iterdir()), DEFAULT_LIMITS, 3)
    assert not scan.series and "same position" in scan.skipped[0].reason


def test_missing_slice_skips_the_series_with_the_gap(tmp_path):
    paths = write_series(tmp_path, stored_values(), shuffle=None)
    paths[4].unlink()
    scan = scan_dicom(sorted(tmp_path.iterdir()), DEFAULT_LIMITS, 3)
    assert not scan.series
    assert "missing slice(s): a gap of 4 mm between slices at 6 and 10 mm" in scan.skipped[0].reason


def test_uneven_spacing_is_resampled_to_the_median_step_with_a_warning(tmp_path):
    steps = np.array([2.0, 2.0, 2.5, 1.5, 2.0, 2.0, 2.0])
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    stored = np.broadcast_to((positions * 10).astype(np.int16)[:, None, None], (K, R, C)).copy()
    write_series(tmp_path, stored, steps=steps)
    series = only_series(tmp_path)
    assert "uneven slice spacing (1.5 to 2.5 mm)" in series.warnings[0]
    vol = read_dicom_series(series, DEFAULT_LIMITS)
    # Values linear in position are interpolated exactly: slice d lies at 2 d mm.
    np.testing.assert_allclose(vol.array[:, 0, 0], 20.0 * np.arange(8), atol=1e-4)
    assert vol.spacing[0] == 2.0 and series.header.shape == vol.array.shape


@pytest.mark.skipif(get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed")
def test_compressed_series_without_its_decoder_is_skipped_naming_the_packages(tmp_path):
    ds = slice_dataset(stored_values()[0], (0, 0, 0), AXIAL)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS"])
    write(ds, tmp_path / "jls.dcm")
    scan = scan_dicom([tmp_path / "jls.dcm"], DEFAULT_LIMITS, 3)
    assert "no decoder for it is installed" in scan.skipped[0].reason
    assert "pylibjpeg" in scan.skipped[0].reason


def test_limits_are_checked_from_the_headers_before_pixels_are_decoded(tmp_path, monkeypatch):
    write_series(tmp_path, stored_values())
    import pydicom

    real = pydicom.dcmread

    def headers_only(path, *args, stop_before_pixels=False, **kw):
        assert stop_before_pixels, f"pixel data of {path} read before the limits were checked"
        return real(path, *args, stop_before_pixels=stop_before_pixels, **kw)

    monkeypatch.setattr(pydicom, "dcmread", headers_only)
    files = sorted(tmp_path.iterdir())
    for limits, words in [
        (ReadLimits(max_voxels=K * R * C - 1), "voxels, more than the limit"),
        (ReadLimits(max_pixels=R * C - 1), "pixels per slice, more than the limit"),
        (ReadLimits(min_spacing=1.5), "is outside [1.5, 50.0] mm"),
    ]:
        scan = scan_dicom(files, limits, 3)
        assert not scan.series and words in scan.skipped[0].reason and scan.skipped[0].kind == "over a limit"
    # A header claiming more pixel bytes than the file holds.
    ds = slice_dataset(stored_values()[0], (0, 0, 0), AXIAL)
    ds.Rows = 4000
    write(ds, tmp_path / "lying.dcm")
    scan = scan_dicom([tmp_path / "lying.dcm"], DEFAULT_LIMITS, 3)
    assert "header claims 96,000 bytes of pixel data" in scan.skipped[0].reason


def test_xray_monochrome1_windowed_and_inverted(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, (20, 24)).astype(np.uint16)
    write(projection(pixels, "MONOCHROME1", window=(2048, 1000), modality="CR"), tmp_path / "cr.dcm")
    write(projection(pixels), tmp_path / "dx.dcm")
    pic = read_dicom_picture(tmp_path / "cr.dcm", DEFAULT_LIMITS)
    # DICOM's linear window: (x - (c - 0.5)) / (w - 1) + 0.5 clipped to [0, 1]; MONOCHROME1: white is low.
    expected = 1 - np.clip((pixels - 2047.5) / 999 + 0.5, 0, 1)
    np.testing.assert_allclose(pic.array[0], expected, atol=1e-6)
    plain = read_dicom_picture(tmp_path / "dx.dcm", DEFAULT_LIMITS).array[0]  # no window: min..max
    np.testing.assert_allclose(plain, (pixels - pixels.min()) / (pixels.max() - pixels.min()), atol=1e-6)
    # A VOI LUT (here 12-bit, inverting) is applied and scaled by its output range.
    ds = projection(pixels)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "US", (4095 - np.arange(4096)).tolist())
    ds.VOILUTSequence = [lut]
    write(ds, tmp_path / "lut.dcm")
    mapped = read_dicom_picture(tmp_path / "lut.dcm", DEFAULT_LIMITS).array[0]
    np.testing.assert_allclose(mapped, (4095 - pixels) / 4095, atol=1e-6)


def test_xray_preprocess_reads_dicom_images_and_ct_skips_a_projection(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, (40, 48)).astype(np.uint16)
    write(projection(pixels, "MONOCHROME1", window=(2048, 1000), modality="CR"), tmp_path / "x" / "cr.dcm")
    write(projection(pixels), tmp_path / "x" / "dx.dcm")
    report = preprocess(tmp_path / "x", tmp_path / "cache", "xray", "quick")
    assert (report.processed, report.samples) == (2, 2)
    with pytest.raises(NoSamplesError, match="not a slice of a volume"):
        preprocess(tmp_path / "x", tmp_path / "cache-ct", "ct", "quick")


def test_folder_dataset_reads_a_dicom_series_as_the_cache_does(tmp_path):
    write_series(tmp_path / "dcm", np.concatenate([stored_values(), stored_values(1)]), spacing=(4.0, 4.0))
    config = get_config("mri", "quick", size=(4, 8, 8), window=8, stride=8)
    ds = FolderDataset(tmp_path / "dcm", config)
    preprocess(tmp_path / "dcm", tmp_path / "cache", "mri", config=config)
    cached = CachedDataset(tmp_path / "cache")
    assert len(ds) == len(cached) == 2 and ds.skipped == []
    for i in range(2):
        np.testing.assert_array_equal(ds[i].numpy(), cached[i].numpy())


def test_preprocess_dicom_gives_the_samples_of_the_nifti_and_counts_non_images(tmp_path):
    stored = stored_values()
    write_series(tmp_path / "dcm" / "a", stored, AXIAL, (2.0, 2.0), steps=np.full(K - 1, 3.0),
                 origin=(-(C - 1) * 2.0, -(R - 1) * 2.0, 0), slope=1.0, intercept=-1024.0)  # fmt: skip
    write(non_image("SR"), tmp_path / "dcm" / "report.dcm")
    write(non_image("RTSTRUCT"), tmp_path / "dcm" / "rtstruct.dcm")
    (tmp_path / "nii").mkdir()
    write_nifti(
        tmp_path / "nii" / "a.nii.gz", (stored[:, ::-1, ::-1] - 1024.0).astype(np.float32), (3.0, 2.0, 2.0)
    )
    config = get_config("ct", "quick", size=(4, 8, 8), window=6, stride=6)
    a = preprocess(tmp_path / "dcm", tmp_path / "ca", "ct", config=config)
    preprocess(tmp_path / "nii", tmp_path / "cb", "ct", config=config)
    assert a.processed == 1 and a.skipped_by_kind() == {"non-image DICOM": 2}
    got, want = (np.load(next((c / "arrays").iterdir())) for c in (tmp_path / "ca", tmp_path / "cb"))
    np.testing.assert_array_equal(got, want)
    assert preprocess(tmp_path / "dcm", tmp_path / "ca", "ct", config=config).reused == 1


def test_cli_series_picks_one_and_an_unknown_uid_exits_2(tmp_path):
    sixteen = np.concatenate([stored_values(), stored_values(1)])  # one window of the quick mri profile
    write_series(tmp_path / "d" / "one", sixteen, series_uid="1.2.3.1")
    write_series(tmp_path / "d" / "two", sixteen, series_uid="1.2.3.2")
    config = get_config("ct", "quick", size=(4, 8, 8), window=4, stride=4, spacing=None)
    assert [f.rel for f in find_sources(tmp_path / "d", config)] == [
        "one/series 1.2.3.1",
        "two/series 1.2.3.2",
    ]
    assert [f.rel for f in find_sources(tmp_path / "d", config, series="1.2.3.2")] == ["two/series 1.2.3.2"]
    run = CliRunner().invoke
    args = ["preprocess", "--modality", "mri", "--data", str(tmp_path / "d"), "--profile", "quick"]
    r = run(main, [*args, "--out", str(tmp_path / "c"), "--series", "1.2.3.2"])
    assert r.exit_code == 0, r.output
    assert "preprocessed 1 files" in r.output
    r = run(main, [*args, "--out", str(tmp_path / "c2"), "--series", "9.9"])
    assert r.exit_code == 2 and "--series 9.9: no DICOM file" in r.output and "1.2.3.1" in r.output
    # A series with a missing slice is skipped and named; --strict stops on it with exit 2.
    next(iter(sorted((tmp_path / "d" / "one").iterdir()))).unlink()
    r = run(main, [*args, "--out", str(tmp_path / "c3")])
    assert r.exit_code == 0 and "skipped one/series 1.2.3.1: missing slice(s)" in r.output, r.output
    r = run(main, [*args, "--out", str(tmp_path / "c4"), "--strict"])
    assert r.exit_code == 2 and "series 1.2.3.1: missing slice(s)" in r.output and "(--strict)" in r.output


def test_without_pydicom_the_error_names_the_extra(tmp_path, monkeypatch):
    write_series(tmp_path, stored_values())
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom raises ImportError
    with pytest.raises(NoSamplesError, match=r"pip install invcoss\[dicom\]"):
        preprocess(tmp_path, tmp_path / "c", "ct", "quick")
    with pytest.raises(ReadError, match=r"needs pydicom \(pip install invcoss\[dicom\]\)"):
        read_dicom_picture(sorted(tmp_path.glob("*.dcm"))[0], DEFAULT_LIMITS)


def test_deflated_series_smaller_than_its_pixels_reads(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stored = np.zeros((K, 64, 64), np.int16)
    stored[:, 10:20, 30:40] = 100
    for k in range(K):
        ds = slice_dataset(stored[k], (0, 0, 2.0 * k), AXIAL)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        path = write(ds, tmp_path / f"{k}.dcm")
        assert path.stat().st_size < stored[k].nbytes  # the size check must not take it for truncated
    vol = read_dicom_series(only_series(tmp_path), DEFAULT_LIMITS)
    assert vol.array.sum() == stored.sum()
