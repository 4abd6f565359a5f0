"""preprocess → cache → datasets: manifest, re-runs that do no work, unreadable files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from invcoss.data import (
    CachedDataset,
    FolderDataset,
    Preprocessor,
    ReadError,
    get_config,
    open_dataset,
    preprocess,
    read_manifest,
    write_phantoms,
)

CT_SIZE, CT_SPACING = (20, 40, 40), (3.0, 2.0, 2.0)  # 60 x 80 x 80 mm -> 4 windows of 24 every 12


@pytest.fixture
def ct_folder(tmp_path):
    folder = tmp_path / "scans"
    write_phantoms(folder, "ct", 3, seed=1, size=CT_SIZE, spacing=CT_SPACING)
    return folder


def add_bad_files(folder):
    good = (folder / "ct_0000.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("acquisition notes, not an image\n")


def test_preprocess_writes_manifest_and_arrays(ct_folder, tmp_path):
    cache = tmp_path / "cache"
    report = preprocess(ct_folder, cache, "ct", "quick")
    assert (report.processed, report.reused, report.skipped) == (3, 0, [])
    assert report.samples == report.new_samples == 12
    manifest = read_manifest(cache)
    assert manifest["modality"] == "ct" and manifest["sample_shape"] == [1, 16, 96, 96]
    assert [s["source"] for s in manifest["sources"]] == [
        "ct_0000.nii.gz",
        "ct_0001.nii.gz",
        "ct_0002.nii.gz",
    ]
    first = manifest["samples"][:4]
    assert [s["window"] for s in first] == [0, 1, 2, 3]
    assert [s["position"] for s in first] == [[0], [12], [24], [36]]
    assert all(s["source"] == "ct_0000.nii.gz" and s["shape"] == [1, 16, 96, 96] for s in first)
    np.testing.assert_allclose(first[0]["spacing"], (24 / 16, 80 / 96, 80 / 96))
    array = np.load(cache / first[0]["array"], mmap_mode="r")
    assert isinstance(array, np.memmap) and array.shape == (4, 1, 16, 96, 96) and array.dtype == np.float32
    # The cache holds exactly what the pipeline gives for the file.
    direct = Preprocessor(get_config("ct", "quick"))(ct_folder / "ct_0000.nii.gz")
    np.testing.assert_array_equal(array[2], direct[2].array)
    assert report.source_bytes == sum(p.stat().st_size for p in ct_folder.iterdir())


def test_rerun_does_no_work(ct_folder, tmp_path):
    cache = tmp_path / "cache"
    preprocess(ct_folder, cache, "ct", "quick")
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    again = preprocess(ct_folder, cache, "ct", "quick")
    assert (again.processed, again.reused, again.new_samples, again.samples) == (0, 3, 0, 12)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == stamps


def test_rerun_redoes_only_changed_and_drops_removed(ct_folder, tmp_path):
    cache = tmp_path / "cache"
    preprocess(ct_folder, cache, "ct", "quick")
    write_phantoms(ct_folder / "more", "ct", 1, seed=9, size=(30, 40, 40), spacing=CT_SPACING)
    (ct_folder / "ct_0002.nii.gz").unlink()
    os.utime(ct_folder / "ct_0001.nii.gz", ns=(1, 1))
    report = preprocess(ct_folder, cache, "ct", "quick")
    assert (report.processed, report.reused) == (2, 1)
    manifest = read_manifest(cache)
    assert [s["source"] for s in manifest["sources"]] == [
        "ct_0000.nii.gz",
        "ct_0001.nii.gz",
        "more/ct_0000.nii.gz",
    ]
    assert report.samples == 4 + 4 + 6 == len(manifest["samples"])
    assert len(list((cache / "arrays").glob("*.npy"))) == 3  # the removed file's array is gone


def test_other_configuration_is_refused(ct_folder, tmp_path):
    cache = tmp_path / "cache"
    preprocess(ct_folder, cache, "ct", "quick")
    with pytest.raises(ValueError, match="another configuration"):
        preprocess(ct_folder, cache, "ct", "paper")
    with pytest.raises(ValueError, match="does not exist"):
        preprocess(tmp_path / "nowhere", cache, "ct", "quick")


def test_unreadable_files_are_reported_skipped_and_counted(ct_folder, tmp_path):
    add_bad_files(ct_folder)
    seen = []
    report = preprocess(ct_folder, tmp_path / "cache", "ct", "quick", on_file=lambda *a: seen.append(a))
    assert report.processed == 3 and report.samples == 12
    reasons = dict(report.skipped)
    assert sorted(reasons) == ["broken.nii.gz", "notes.txt"]
    assert "cannot read voxel data" in reasons["broken.nii.gz"]
    assert "not a NIfTI file" in reasons["notes.txt"]
    assert [(a[1], a[2], a[3]) for a in seen if a[3] == "skipped"] == [
        (5, "broken.nii.gz", "skipped"),
        (5, "notes.txt", "skipped"),
    ]
    manifest = read_manifest(tmp_path / "cache")
    assert [s["source"] for s in manifest["skipped"]] == ["broken.nii.gz", "notes.txt"]


def test_strict_raises_on_the_first_unreadable_file(ct_folder, tmp_path):
    add_bad_files(ct_folder)
    with pytest.raises(ReadError, match="broken.nii.gz"):
        preprocess(ct_folder, tmp_path / "cache", "ct", "quick", strict=True)


def test_cached_and_folder_datasets_agree(ct_folder, tmp_path):
    cache = tmp_path / "cache"
    preprocess(ct_folder, cache, "ct", "quick")
    cached = open_dataset(cache, "ct")
    folder = open_dataset(ct_folder, config=get_config("ct", "quick"))
    assert isinstance(cached, CachedDataset) and isinstance(folder, FolderDataset)
    assert len(cached) == len(folder) == 12
    for i in (0, 5, 11, 3):
        a, b = cached[i], folder[i]
        assert a.shape == (1, 16, 96, 96) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cached.source_bytes == folder.source_bytes
    with pytest.raises(ValueError, match="holds ct data, but modality 'mri'"):
        CachedDataset(cache, "mri")
    with pytest.raises(ValueError, match="not a cache; give the modality"):
        open_dataset(ct_folder)


def test_folder_dataset_skips_unreadable_headers(ct_folder):
    add_bad_files(ct_folder)
    (ct_folder / "empty.nii").write_bytes(b"")
    ds = FolderDataset(ct_folder, get_config("ct", "quick"))
    # The truncated .nii.gz keeps a readable header: it is listed, and fails by name when read.
    assert sorted(n for n, _ in ds.skipped) == ["empty.nii", "notes.txt"]
    assert len(ds) == 16
    broken = next(i for i, (f, _) in enumerate(ds.index) if ds.files[f].name == "broken.nii.gz")
    with pytest.raises(ReadError, match="broken.nii.gz"):
        ds[broken]
    with pytest.raises(ReadError, match="empty.nii"):
        FolderDataset(ct_folder, get_config("ct", "quick"), strict=True)


def test_manifest_is_json_with_relative_paths(ct_folder, tmp_path):
    cache = tmp_path / "cache"
    preprocess(ct_folder, cache, "ct", "quick")
    text = (cache / "manifest.json").read_text()
    assert str(tmp_path) not in text  # the cache can be moved
    assert json.loads(text)["config"]["size"] == [16, 96, 96]
    moved = tmp_path / "moved"
    cache.rename(moved)
    assert len(CachedDataset(moved)) == 12


@pytest.mark.parametrize("modality", ["xray", "pathology", "mri"])
def test_preprocess_other_modalities(tmp_path, modality):
    size = (24, 40, 40) if modality == "mri" else (80, 90)
    write_phantoms(tmp_path / "src", modality, 2, size=size)
    report = preprocess(tmp_path / "src", tmp_path / "cache", modality, "quick")
    ds = CachedDataset(tmp_path / "cache")
    expected = (1, 16, 96, 96) if modality == "mri" else (3, 112, 112)
    assert report.samples == len(ds) == (4 if modality == "mri" else 2)
    assert tuple(ds[1].shape) == expected
