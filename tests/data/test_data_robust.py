"""Broken, hostile and unusual inputs: limits from the header, per-file isolation, honest outcomes.

Every file here is generated small in ``tmp_path``; a header may claim far more than the file holds.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import invcoss.data.cache as cache_module
import invcoss.data.limits as limits_module
import invcoss.data.readers as readers_module
from invcoss.cli import main
from invcoss.cli.data import LIMIT_DEFAULTS
from invcoss.continual.probe import read_labelled_csv
from invcoss.data import (
    DEFAULT_LIMITS,
    FolderDataset,
    NoSamplesError,
    Preprocessor,
    ReadError,
    ReadLimits,
    get_config,
    preprocess,
    read_manifest,
    read_nifti,
    read_nifti_header,
    read_picture,
    write_nifti,
    write_phantoms,
    write_png,
)

QUICK_CT = get_config("ct", "quick")


def claiming_nifti(path, shape, dtype=np.int16, zooms=None, payload: int = 1000):
    """A NIfTI file whose header claims ``shape`` but which holds ``payload`` bytes of voxel data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(zooms or (1.0,) * len(shape))
    header.set_data_offset(352)
    blob = header.binaryblock + b"\0" * 4 + b"\0" * payload
    path.write_bytes(gzip.compress(blob) if str(path).endswith(".gz") else blob)
    return path


def claiming_png(path, width: int, height: int):
    """A 70-byte PNG whose IHDR claims ``width`` x ``height`` grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    blob = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    path.write_bytes(blob + chunk(b"IEND", b""))
    return path


def volume(path, shape=(30, 24, 24), spacing=(2.0, 2.0, 2.0), frames: int | None = None):
    """A smooth random CT-like volume written with nibabel: ``shape`` in (x, y, z) file order."""
    rng = np.random.default_rng(0)
    full = (*shape, frames) if frames else shape
    data = (rng.standard_normal(full) * 300).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


# --- limits checked from the header ------------------------------------------------------------


# Loads limits.py and readers.py alone (they import numpy and nibabel only), so the subprocess
# starts in half a second instead of importing torch with the package.
MEMORY_PROBE = """
import importlib.util, json, resource, sys
for name, file in (("invcoss.data.limits", sys.argv[1]), ("readers", sys.argv[2])):
    spec = importlib.util.spec_from_file_location(name, file)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
readers = sys.modules["readers"]
import nibabel  # noqa: F401  (its import is not what is measured)
assert "torch" not in sys.modules
peaks = {}
for path in sys.argv[3:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        readers.read_nifti(path)
        outcome = "read"
    except readers.ReadError as e:
        outcome = e.kind
    peaks[path] = (outcome, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
print(json.dumps(peaks))
"""


def test_header_claims_are_rejected_before_any_allocation(tmp_path):
    """1.3 KB files claiming 1000^3 (over max_voxels) and 800^3 int16 (1 GB against the file size)."""
    files = [
        claiming_nifti(tmp_path / "billion.nii", (1000, 1000, 1000)),
        claiming_nifti(tmp_path / "claim.nii", (800, 800, 800)),
        claiming_nifti(tmp_path / "claim.nii.gz", (800, 800, 800)),
        claiming_nifti(tmp_path / "wide.nii", (3000, 3000, 1000)),
    ]
    assert all(f.stat().st_size < 1500 for f in files)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_PROBE,
            limits_module.__file__,
            readers_module.__file__,
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    peaks = json.loads(out.stdout)
    kinds = {name.rsplit("/", 1)[1]: kind for name, (kind, _) in peaks.items()}
    assert kinds == {
        "billion.nii": "over a limit",
        "claim.nii": "unreadable",
        "claim.nii.gz": "unreadable",
        "wide.nii": "over a limit",
    }
    # Before the header checks the 1000^3 file took 2.35 GB; now the peak does not move.
    assert max(mb for _, mb in peaks.values()) < 64, peaks


def test_limit_messages_name_the_option(tmp_path):
    f = claiming_nifti(tmp_path / "claim.nii", (800, 800, 800))
    with pytest.raises(
        ReadError,
        match=r"claims 1,024,000,000 bytes of voxel data but the file holds 1,000 after its 352-byte header",
    ) as e:
        read_nifti(f)
    assert e.value.kind == "unreadable" and e.value.path == f
    f = claiming_nifti(tmp_path / "big.nii", (1000, 1000, 1000))
    with pytest.raises(ReadError, match="more than the limit of 536,870,912 .*--max-voxels"):
        read_nifti_header(f)
    # Raised, the voxel limit lets the header through to the size check.
    with pytest.raises(ReadError, match="bytes of voxel data"):
        read_nifti_header(f, ReadLimits(max_voxels=10**10))


def test_truncated_uncompressed_nifti_is_unreadable_from_its_header(tmp_path):
    path = write_nifti(tmp_path / "scan.nii", np.zeros((20, 16, 16), np.float32), (1.0, 1.0, 1.0))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(ReadError, match="scan.nii: header claims 20,480 bytes .* holds 20,380 after") as e:
        read_nifti_header(path)
    assert e.value.kind == "unreadable"


def test_spacing_range_and_resampled_voxels(tmp_path):
    big = volume(tmp_path / "big.nii.gz", (20, 20, 20), (500.0, 500.0, 500.0))
    with pytest.raises(ReadError, match=r"outside \[0.01, 50.0\] mm .*--max-spacing") as e:
        Preprocessor(QUICK_CT).run(big)
    assert e.value.kind == "over a limit"
    # Allowed spacing: resampling 500 mm voxels to 1 mm would make 10^12 voxels (4 TB), caught first.
    pre = Preprocessor(QUICK_CT, ReadLimits(max_spacing=1000.0))
    with pytest.raises(ReadError, match="10000x10000x10000 = 1,000,000,000,000 voxels after resampling"):
        pre.run(big)
    with pytest.raises(ReadError, match="after resampling"):
        pre.count(big)  # the same check from the header, for FolderDataset
    tiny = volume(tmp_path / "tiny.nii.gz", (40, 40, 40), (0.001, 0.001, 0.001))
    with pytest.raises(ReadError, match=r"\(0.001, 0.001, 0.001\) mm is outside"):
        Preprocessor(QUICK_CT).run(tiny)
    with pytest.raises(ValueError, match="min_spacing < max_spacing"):
        ReadLimits(min_spacing=2.0, max_spacing=1.0)
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        ReadLimits(max_voxels=0)


def test_huge_png_claims_are_rejected_from_the_header(tmp_path):
    huge = claiming_png(tmp_path / "slide.png", 15000, 15000)
    with pytest.raises(ReadError, match=r"15000x15000 = 225,000,000 pixels, more than .*--max-pixels") as e:
        read_picture(huge)
    assert e.value.kind == "over a limit" and huge.stat().st_size < 100
    # Raised over Pillow's own bound, the limit is ours alone; a claim the data cannot back is unreadable.
    small = claiming_png(tmp_path / "tile.png", 3000, 3000)
    with pytest.raises(ReadError, match="claims 3000x3000 pixels .* inflate to at most") as e:
        read_picture(small, ReadLimits(max_pixels=10**7))
    assert e.value.kind == "unreadable"
    real = write_png(tmp_path / "real.png", np.full((64, 64), 0.5))
    assert read_picture(real, ReadLimits(max_pixels=64 * 64)).array.shape == (1, 64, 64)
    with pytest.raises(ReadError, match="4,096 pixels, more than the limit of 4,095"):
        read_picture(real, ReadLimits(max_pixels=64 * 64 - 1))


def test_png_pixels_the_compressed_data_cannot_hold_are_rejected_before_decoding(tmp_path):
    """Within max_pixels, a 70-byte PNG claiming 10000x10000 RGBA made Pillow allocate 400 MB."""
    claim = claiming_png(tmp_path / "claim.png", 10000, 10000)
    blob = bytearray(claim.read_bytes())
    blob[25] = 6  # colour type RGBA, CRC fixed
    struct.pack_into(">I", blob, 29, zlib.crc32(bytes(blob[12:29])))
    claim.write_bytes(bytes(blob))
    with pytest.raises(
        ReadError, match=r"claims 10000x10000 pixels \(400,000,000 bytes\) but its \d+ bytes"
    ) as e:
        read_picture(claim)
    assert e.value.kind == "unreadable"
    # The bound is deflate's best ratio: constant images, the most compressible there are, still read.
    for mode, value in (("1", 1), ("L", 0), ("RGB", (0, 0, 0))):
        path = tmp_path / f"flat-{mode}.png"
        Image.new(mode, (3000, 2000), value).save(path)
        assert read_picture(path).array.shape[1:] == (2000, 3000)


def test_a_chunk_length_past_the_end_of_a_png_allocates_nothing(tmp_path):
    """An IDAT length of 4 GB in a 100-byte PNG: Pillow read(length) allocated all of it first."""
    path = write_png(tmp_path / "grey.png", np.full((7, 5), 0.5))
    blob = bytearray(path.read_bytes())
    idat = blob.index(b"IDAT") - 4
    struct.pack_into(">I", blob, idat, 2**32 - 1)
    path.write_bytes(bytes(blob))
    tracemalloc.start()
    try:
        array = read_picture(path).array  # the pixels are all there: Pillow reads them
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(array, np.full((1, 7, 5), 128 / 255), atol=1e-6)
    assert peak < 2**20, peak


def test_a_tiff_whose_strips_do_not_cover_its_size_is_unreadable(tmp_path):
    """ImageLength raised from 8 to 65535 past the one strip: Pillow read 65535 rows, 65527 of zeros."""
    path = tmp_path / "strip.tif"
    Image.fromarray(np.full((8, 6, 3), 200, np.uint8)).save(path)
    blob = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", blob, 4)[0]
    for i in range(struct.unpack_from("<H", blob, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", blob, entry)[0] == 257:  # ImageLength
            struct.pack_into("<I", blob, entry + 8, 65535)
    path.write_bytes(bytes(blob))
    with pytest.raises(ReadError, match=r"covers 48 of the 6x65535 = 393,210 pixels of its header") as e:
        read_picture(path)
    assert e.value.kind == "unreadable"


def _set_tiff_tags(path, values: dict[int, int]) -> None:
    """Rewrite LONG or SHORT tags of the first IFD of a little-endian TIFF in place."""
    blob = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", blob, 4)[0]
    for i in range(struct.unpack_from("<H", blob, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", blob, entry)
        if tag in values:
            struct.pack_into("<I" if kind == 4 else "<H", blob, entry + 8, values[tag])
    path.write_bytes(bytes(blob))


def test_an_uncompressed_tiff_whose_strips_lie_past_the_file_is_unreadable(tmp_path):
    """Strips that cover a 5000x5000 claim (one strip of all rows, its byte count raised) in a file of
    a few hundred bytes: Pillow allocated the 75 MB image before finding the data missing."""
    path = tmp_path / "strip.tif"
    Image.fromarray(np.full((8, 6, 3), 200, np.uint8)).save(path)
    assert read_picture(path).array.shape == (3, 8, 6)  # the file as saved reads
    # ImageWidth, ImageLength, RowsPerStrip, StripByteCounts
    _set_tiff_tags(path, {256: 5000, 257: 5000, 278: 5000, 279: 5000 * 5000 * 3})
    with pytest.raises(ReadError, match=r"claims 5000x5000 uncompressed pixels \(75,000,000 bytes\) but the "
                       r"file holds 144 bytes from its first strip on") as e:  # fmt: skip
        read_picture(path)
    assert e.value.kind == "unreadable"


# --- samples that mean something -------------------------------------------------------------


def test_a_single_slice_is_not_a_ct_volume(tmp_path):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.float32), np.eye(4)), str(flat))
    with pytest.raises(ReadError, match="a single slice \\(1x40x40 voxels\\), but ct needs a volume") as e:
        Preprocessor(QUICK_CT).run(flat)
    assert e.value.kind == "no usable sample"


def test_volumes_smaller_than_a_window_are_skipped(tmp_path):
    # 0.02 mm voxels are inside the spacing range but 40 of them make 0.8 mm: one voxel at 1 mm.
    tiny = volume(tmp_path / "tiny.nii.gz", (40, 40, 40), (0.02, 0.02, 0.02))
    with pytest.raises(ReadError, match="1x1x1 voxels after resampling .* fewer than one window of 24") as e:
        Preprocessor(QUICK_CT).run(tiny)
    assert e.value.kind == "no usable sample"
    short = volume(tmp_path / "short.nii.gz", (30, 30, 10), (1.0, 1.0, 2.0))  # 20 mm: 20 slices
    with pytest.raises(ReadError, match="20x30x30 voxels after resampling"):
        Preprocessor(QUICK_CT).count(short)
    needle = volume(tmp_path / "needle.nii.gz", (3, 3, 40), (0.2, 0.2, 1.0))  # 0.6 mm across
    with pytest.raises(ReadError, match="40x1x1 voxels after resampling .*: under 2 voxels across in plane"):
        Preprocessor(QUICK_CT).run(needle)
    mri = volume(tmp_path / "mri.nii.gz", (30, 30, 12), (1.0, 1.0, 1.0))
    with pytest.raises(ReadError, match="12x30x30 voxels: fewer than one window of 16"):
        Preprocessor(get_config("mri", "quick")).run(mri)


def test_unusual_spacing_is_warned_about(tmp_path):
    thick = volume(tmp_path / "thick.nii.gz", (24, 24, 10), (1.0, 1.0, 12.0))  # 120 mm in 12 mm slices
    result = Preprocessor(QUICK_CT).run(thick)
    assert len(result.samples) == 9
    assert result.warnings == ["unusual voxel spacing 12x1x1 mm (outside 0.1 to 10.0 mm): check the header"]


def test_4d_series_first_or_all_frames(tmp_path):
    series = volume(tmp_path / "series.nii.gz", (24, 24, 30), (1.0, 1.0, 1.0), frames=3)
    first = Preprocessor(QUICK_CT).run(series)
    assert first.frames == 3 and len(first.samples) == 1
    assert "4D series of 3 volumes: only the first is used" in first.warnings[0]
    every = Preprocessor(QUICK_CT, frames="all").run(series)
    assert len(every.samples) == 3 and [s.frame for s in every.samples] == [0, 1, 2]
    assert [s.index for s in every.samples] == [0, 1, 2]
    assert "each is preprocessed as a volume" in every.warnings[0]
    for f, s in enumerate(every.samples):
        direct = Preprocessor(QUICK_CT)(read_nifti(series, frame=f))
        np.testing.assert_array_equal(s.array, direct[0].array)
    assert Preprocessor(QUICK_CT, frames="all").count(series) == 3
    with pytest.raises(ValueError, match="frames must be one of first, all, got 'some'"):
        Preprocessor(QUICK_CT, frames="some")

    report = preprocess(tmp_path, tmp_path / "cache", "ct", "quick", frames="all")
    manifest = read_manifest(tmp_path / "cache")
    assert report.samples == 3 and [s["frame"] for s in manifest["samples"]] == [0, 1, 2]
    assert manifest["frames"] == "all" and manifest["sources"][0]["source_frames"] == 3
    assert report.warnings == [("series.nii.gz", every.warnings[0])]
    # Another --frames redoes the file instead of reusing it.
    again = preprocess(tmp_path, tmp_path / "cache", "ct", "quick", frames="first")
    assert (again.processed, again.reused, again.samples) == (1, 0, 1)


# --- one file never ends the run -------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """Two good CT phantoms and one of each kind of bad file."""
    folder = tmp_path / "scans"
    write_phantoms(folder, "ct", 2, size=(20, 32, 32))
    claiming_nifti(folder / "claims.nii", (1000, 1000, 1000))
    volume(folder / "coarse.nii.gz", (20, 20, 20), (500.0, 500.0, 500.0))
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.float32), np.eye(4)), str(folder / "flat.nii.gz"))
    (folder / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_every_bad_file_is_named_counted_and_skipped(mixed, tmp_path):
    report = preprocess(mixed, tmp_path / "cache", "ct", "quick")
    assert report.processed == 2 and report.samples == 6
    assert report.skip_kinds == {
        "claims.nii": "over a limit",
        "coarse.nii.gz": "over a limit",
        "flat.nii.gz": "no usable sample",
        "notes.txt": "not an image",
        "slice.dcm": "unreadable",
    }
    assert report.skipped_by_kind() == {
        "over a limit": 2,
        "no usable sample": 1,
        "not an image": 1,
        "unreadable": 1,
    }
    kinds = {s["source"]: s["kind"] for s in read_manifest(tmp_path / "cache")["skipped"]}
    assert kinds == report.skip_kinds


def test_an_unexpected_failure_of_one_file_is_isolated(mixed, tmp_path, monkeypatch):
    real = Preprocessor._volume_samples

    def failing(self, vol):
        if vol.path.name == "ct_0001.nii.gz":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(self, vol)

    monkeypatch.setattr(Preprocessor, "_volume_samples", failing)
    report = preprocess(mixed, tmp_path / "cache", "ct", "quick")
    assert report.processed == 1
    reasons = dict(report.skipped)
    assert (
        reasons["ct_0001.nii.gz"]
        == "failed while preprocessing (RuntimeError: DefaultCPUAllocator: can't allocate memory)"
    )
    assert report.skip_kinds["ct_0001.nii.gz"] == "failed"
    good = tmp_path / "good"
    write_phantoms(good, "ct", 2, size=(20, 32, 32))
    with pytest.raises(ReadError, match="ct_0001.nii.gz: failed while preprocessing") as e:
        preprocess(good, tmp_path / "strict", "ct", "quick", strict=True)
    assert e.value.kind == "failed"


def test_a_failed_write_skips_only_its_file(mixed, tmp_path, monkeypatch):
    real = cache_module.atomic_save_npy

    def full_disk(path, array):
        if "ct_0000" in path.name:
            raise OSError(28, "No space left on device")
        return real(path, array)

    monkeypatch.setattr(cache_module, "atomic_save_npy", full_disk)
    report = preprocess(mixed, tmp_path / "cache", "ct", "quick")
    assert report.processed == 1 and report.skip_kinds["ct_0000.nii.gz"] == "failed"
    assert (
        "cannot write its samples (OSError: [Errno 28] No space left on device)"
        in dict(report.skipped)["ct_0000.nii.gz"]
    )


def test_folder_dataset_skips_what_preprocess_skips(mixed):
    ds = FolderDataset(mixed, QUICK_CT)
    assert len(ds.files) == 2 and len(ds) == 6
    assert sorted(dict(ds.skipped)) == [
        "claims.nii",
        "coarse.nii.gz",
        "flat.nii.gz",
        "notes.txt",
        "slice.dcm",
    ]


def test_only_arrays_of_the_earlier_manifest_are_removed(tmp_path):
    scans, cache = tmp_path / "scans", tmp_path / "cache"
    write_phantoms(scans, "ct", 2, size=(20, 32, 32))
    (cache / "arrays").mkdir(parents=True)
    foreign = [
        cache / "arrays" / "mine.npy",
        cache / "arrays" / "ct_0001-0123456789.npy",
        cache / "notes.txt",
    ]
    for f in foreign:
        f.write_bytes(b"user data")
    preprocess(scans, cache, "ct", "quick")
    written = {s["source"]: s["array"] for s in read_manifest(cache)["sources"]}
    (scans / "ct_0001.nii.gz").unlink()
    report = preprocess(scans, cache, "ct", "quick")
    assert report.samples == 3
    assert not (cache / written["ct_0001.nii.gz"]).exists()  # its own array of a removed source
    assert (cache / written["ct_0000.nii.gz"]).exists()
    assert all(f.read_bytes() == b"user data" for f in foreign)


# --- the CLI: exit codes and summaries -------------------------------------------------------


def invoke(folder, out, *extra):
    args = ["preprocess", "--modality", "ct", "--data", str(folder), "--out", str(out), "--profile", "quick"]
    return CliRunner().invoke(main, [*args, *extra])


def assert_no_samples(r, out, *parts):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for part in parts:
        assert part in r.stderr, r.stderr
    assert not (out / "manifest.json").exists()


def test_cli_runs_that_give_nothing_exit_2_with_the_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_no_samples(invoke(empty, tmp_path / "c1"), tmp_path / "c1", "holds no files", "check --data")

    text = tmp_path / "text"
    text.mkdir()
    for name in ("a.txt", "b.txt", "c.csv"):
        (text / name).write_text("x\n")
    r = invoke(text, tmp_path / "c2")
    assert_no_samples(
        r, tmp_path / "c2", "none of the 3 files", "is a ct file (.nii or .nii.gz)", "2 .txt, 1 .csv"
    )

    corrupt = tmp_path / "corrupt"
    write_phantoms(corrupt, "ct", 2, size=(20, 32, 32))
    for f in corrupt.iterdir():
        f.write_bytes(f.read_bytes()[:200])
    r = invoke(corrupt, tmp_path / "c3")
    assert_no_samples(
        r, tmp_path / "c3", "none of the 2 files", "gave a ct sample (2 unreadable", "skipped ct_0000.nii.gz"
    )

    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for i in range(3):
        (dicom / f"IM{i:04d}").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    r = invoke(dicom, tmp_path / "c4")
    assert_no_samples(
        r, tmp_path / "c4", "none of the 3 files", "(3 unreadable", "without SOPClassUID, Rows or Columns"
    )


def test_cli_summary_counts_and_strict(mixed, tmp_path):
    r = invoke(mixed, tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert (
        "preprocessed 2 files (0 already done, 5 skipped: 2 over a limit, 1 no usable sample, "
        "1 not an image, 1 unreadable) -> 6 samples" in r.stdout
    )
    assert "skipped slice.dcm: a DICOM file without SOPClassUID" in r.stderr
    assert "skipped flat.nii.gz: a single slice" in r.stderr
    r = invoke(mixed, tmp_path / "s", "--strict")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "claims.nii" in r.stderr and "--max-voxels" in r.stderr and "(--strict)" in r.stderr


def test_cli_limit_options(tmp_path):
    assert LIMIT_DEFAULTS == {
        "max_voxels": DEFAULT_LIMITS.max_voxels,
        "max_pixels": DEFAULT_LIMITS.max_pixels,
        "min_spacing": DEFAULT_LIMITS.min_spacing,
        "max_spacing": DEFAULT_LIMITS.max_spacing,
    }
    scans = tmp_path / "scans"
    write_phantoms(scans, "ct", 1, size=(20, 32, 32))  # 20x32x32 = 20,480 voxels at 2.5x1.6x1.6 mm
    r = invoke(scans, tmp_path / "c", "--max-voxels", "20000")
    assert r.exit_code == 2 and "20,480 voxels per volume, more than the limit of 20,000" in r.stderr
    r = invoke(scans, tmp_path / "c", "--max-spacing", "2")
    assert r.exit_code == 2 and "outside [0.01, 2.0] mm" in r.stderr
    r = invoke(scans, tmp_path / "c", "--min-spacing", "3", "--max-spacing", "2")
    assert r.exit_code == 2 and "--min-spacing (3.0) must be below --max-spacing (2.0)" in r.stderr
    # Resampled to 1 mm the phantom is 50x51x51 = 130,050 voxels: the limit applies there too.
    r = invoke(scans, tmp_path / "c", "--max-voxels", "130049")
    assert r.exit_code == 2 and "50x51x51 = 130,050 voxels after resampling" in r.stderr
    r = invoke(scans, tmp_path / "c", "--max-voxels", "130050")
    assert r.exit_code == 0 and "-> 3 samples" in r.stdout
    assert read_manifest(tmp_path / "c")["limits"]["max_voxels"] == 130050


def test_cli_frames_option_warns(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    volume(scans / "series.nii.gz", (24, 24, 30), (1.0, 1.0, 1.0), frames=2)
    r = invoke(scans, tmp_path / "c")
    assert r.exit_code == 0 and "-> 1 samples" in r.stdout
    assert "warning: series.nii.gz: a 4D series of 2 volumes: only the first is used" in r.stderr
    r = invoke(scans, tmp_path / "d", "--frames", "all")
    assert r.exit_code == 0 and "-> 2 samples" in r.stdout
    assert "each is preprocessed as a volume" in r.stderr


def test_no_samples_error_keeps_the_report(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.txt").write_text("x")
    with pytest.raises(NoSamplesError) as e:
        preprocess(tmp_path / "scans", tmp_path / "cache", "ct", "quick")
    assert e.value.report.skipped == [
        ("a.txt", "not a NIfTI file (.nii or .nii.gz), which modality ct needs")
    ]


def test_labelled_csv_names_a_file_over_a_limit(tmp_path):
    files = write_phantoms(tmp_path, "xray", 2, size=(32, 32))
    claiming_png(tmp_path / "slide.png", 15000, 15000)
    rows = [f"{p.name},{label}" for p, label in zip(files, "ab")] + ["slide.png,a"]
    (tmp_path / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="cannot read slide.png: 15000x15000 = 225,000,000 pixels"):
        read_labelled_csv(tmp_path / "labels.csv", "xray", (32, 32), channels=3)


def test_broken_links_and_pipes_are_skipped_not_read(tmp_path):
    scans = tmp_path / "scans"
    write_phantoms(scans, "ct", 1, size=(20, 32, 32))
    (scans / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    os.mkfifo(scans / "pipe.nii")  # reading it would block forever
    report = preprocess(scans, tmp_path / "cache", "ct", "quick")
    assert report.processed == 1
    assert dict(report.skipped) == {
        "gone.nii.gz": "cannot open (No such file or directory)",
        "pipe.nii": "not a regular file",
    }
    assert dict(FolderDataset(scans, QUICK_CT).skipped) == dict(report.skipped)
