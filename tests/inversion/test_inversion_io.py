"""Files of an inversion run: formats, manifest, determinism, resume after an interruption, guards."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import invcoss.data
import invcoss.inversion.files
from invcoss.data import read_nifti
from invcoss.feature_stats import collect_feature_stats
from invcoss.inversion import Inverter, NonFiniteLossError
from invcoss.inversion.config import InversionConfig
from invcoss.inversion.run import RunFolderError
from invcoss.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"img_size_2d": 32, "img_size_3d": (16, 32, 32)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vit_nano", **SIZES)


def _stats(model, modality: str):
    g = torch.Generator().manual_seed(1)
    x = (
        torch.rand(6, 3, 32, 32, generator=g)
        if modality == "xray"
        else torch.rand(6, 1, 16, 32, 32, generator=g) * 2 - 1
    )
    return collect_feature_stats(model, x, modality=modality)


@pytest.fixture(scope="module")
def ct_stats(model):
    return _stats(model, "ct")


def ct_config(**kw) -> InversionConfig:
    base = dict(
        modality="ct", batch_size=2, min_batch_size=1, steps=2, warmup_steps=3, generator_every=2,
        latent_dim=8, generator_channels=(8, 8, 4, 4),
    )  # fmt: skip
    return InversionConfig(**(base | kw))


def interrupt_at(batch: int):
    """An ``on_step`` that stops the run (as Ctrl-C would) at the first step of ``batch``."""

    def on_step(info) -> None:
        if info.batch == batch and info.step == 1:
            raise KeyboardInterrupt

    return on_step


def files_of(out) -> dict[str, bytes]:
    """Every file of a run folder except the manifest and preview (which carry timings), by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "preview.png")
    }


def test_3d_run_writes_float32_nifti_with_spacing_and_a_manifest(tmp_path, model, ct_stats):
    inv = Inverter(model, ct_stats, ct_config(), backend="torch")
    result = inv.run(5, tmp_path / "run")
    out = tmp_path / "run"
    names = [f"samples/ct_{i:05d}.nii.gz" for i in range(5)]
    assert sorted(files_of(out)) == names  # no state, no temporary file left
    assert [p.relative_to(out).as_posix() for p in result.files] == names
    # A default CT phantom (160 px x 1.6 mm = 256 mm across) through the CT preprocessing: windows
    # of 24 slices of 1 mm and whole 256 mm slices, resized to the model's 16x32x32.
    expected_spacing = (24.0 / 16, 256.0 / 32, 256.0 / 32)
    memory = Inverter(model, ct_stats, ct_config(), backend="torch").generate(5).images
    for i, p in enumerate(result.files):
        img = nib.load(p)
        assert img.get_data_dtype() == np.float32
        assert np.allclose(np.diag(img.affine)[:3], expected_spacing[::-1])  # (W, H, D) axes
        assert img.header.get_slope_inter() == (None, None)  # no scaling: the stored floats are HU
        assert (img.header["cal_min"], img.header["cal_max"]) == (-1024.0, 1024.0)
        assert b"synthetic CT" in img.header["descrip"].item() and nib.aff2axcodes(img.affine) == (
            "R",
            "A",
            "S",
        )
        vol = read_nifti(p)
        assert vol.spacing == pytest.approx(expected_spacing)
        # Hounsfield units: what the model saw x 1024, exactly (a power of two)
        np.testing.assert_array_equal(vol.array, memory[i, 0].numpy() * 1024)
    m = json.loads((out / "manifest.json").read_text())
    assert m["sample_format"] == "nifti" and m["file_scale"] == 1024.0 and "Hounsfield" in m["file_values"]
    back = next(invcoss.inversion.files.read_samples(result.files, 5, m))  # what the report reads
    np.testing.assert_array_equal(back.numpy(), memory.numpy())  # model space, bit for bit
    assert m["complete"] and m["num_batches"] == 3 and m["resume_state"] is None
    assert [len(b["samples"]) for b in m["batches"]] == [2, 2, 1]
    assert [b["steps"] for b in m["batches"]] == [3, 2, 3]  # fresh generators at batches 0 and 2
    assert InversionConfig.from_dict(m["identity"]["config"]) == inv.config
    assert len(m["identity"]["model"]["weights_sha256"]) == 64 and len(m["identity"]["stats_sha256"]) == 64
    for b in m["batches"]:
        assert set(b["curves"]) == {"step", "task", "norm", "img", "rep", "total"}
        assert len(b["curves"]["norm"]) == b["steps"] and b["seconds"] > 0
        assert b["stat_loss"] > 0 and b["noise_stat_loss"] > 0
    q = m["quality"]
    assert q["num_samples"] == 5 and q["stat_loss"]["synthetic"] == pytest.approx(
        np.mean([b["stat_loss"] for b in m["batches"]])
    )
    assert -1 <= q["mean_pairwise_cosine"]["synthetic"] <= 1
    assert len(q["mean_distance_std"]["synthetic"]) == len(q["mean_distance_std"]["noise"]) == 3
    assert all(d > 0 for d in q["mean_distance_std"]["synthetic"])
    assert list(q["intensity"]["synthetic"]) == ["air", "lung", "mixed", "soft tissue", "dense"]
    assert sum(q["intensity"]["synthetic"].values()) == pytest.approx(1.0)
    with Image.open(out / "preview.png") as im:  # 5 central slices, framed by 9-pixel letter bands, on a
        tile = 32 + 2 * 9  # 3x2 grid with 2-pixel gaps
        assert im.size == (3 * tile + 4, 2 * tile + 2) and im.mode == "L"


def test_3d_spacing_follows_the_config_then_a_reference_cache_then_the_phantoms(tmp_path, model, ct_stats):
    from invcoss.data import get_config, preprocess, write_phantoms

    assert invcoss.inversion.files.nominal_spacing("ct", (16, 96, 96)) == (1.5, 2.6667, 2.6667)
    assert invcoss.inversion.files.nominal_spacing("xray", (32, 32)) is None
    # A cache of phantoms 30 mm x 96 mm x 96 mm across: 24-slice windows of 1 mm, 96 mm over 32.
    write_phantoms(tmp_path / "scans", "ct", 1, size=(10, 48, 48), spacing=(3.0, 2.0, 2.0))
    cache = tmp_path / "cache"
    preprocess(tmp_path / "scans", cache, "ct", config=get_config("ct", "paper", size=(16, 32, 32)))
    assert invcoss.inversion.files.reference_spacing(cache) == pytest.approx((1.5, 3.0, 3.0))
    config = ct_config(batch_size=4, steps=1, warmup_steps=1)
    run = Inverter(model, ct_stats, config, backend="torch").run(4, tmp_path / "ref", reference=cache)
    assert read_nifti(run.files[0]).spacing == pytest.approx((1.5, 3.0, 3.0))
    assert run.manifest["spacing_mm"] == pytest.approx([1.5, 3.0, 3.0])
    assert run.quality["mean_distance_std"]["reference"] and run.quality["intensity"]["reference"]
    given = Inverter(model, ct_stats, config.replace(spacing=(2.0, 1.0, 1.0)), backend="torch")
    run = given.run(4, tmp_path / "given", reference=cache)
    assert read_nifti(run.files[0]).spacing == pytest.approx((2.0, 1.0, 1.0))


def test_2d_run_writes_float_arrays_and_png_copies(tmp_path, model):
    stats = _stats(model, "xray")
    config = InversionConfig(
        modality="xray", batch_size=2, min_batch_size=1, steps=2, warmup_steps=2, generator_every=1, latent_dim=8,
        generator_channels=(8, 8, 4),
    )  # fmt: skip
    result = Inverter(model, stats, config, backend="torch").run(3, tmp_path)
    memory = Inverter(model, stats, config, backend="torch").generate(3).images
    for i in range(3):
        a = np.load(tmp_path / f"samples/xray_{i:05d}.npy")
        assert a.dtype == np.float32 and a.shape == (3, 32, 32)
        np.testing.assert_array_equal(a, memory[i].numpy())
        assert np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2])  # grey, replicated
        with Image.open(tmp_path / f"png/xray_{i:05d}.png") as im:
            assert im.mode == "L" and im.size == (32, 32)
            assert np.abs(np.asarray(im) / 255.0 - a[0]).max() <= 0.5 / 255 + 1e-6
    assert len(result.files) == 3


def test_other_sample_formats_read_back_in_model_space(tmp_path, model, ct_stats):
    config = ct_config(batch_size=2, steps=1, warmup_steps=1)
    memory = Inverter(model, ct_stats, config, backend="torch").generate(2).images
    run = Inverter(model, ct_stats, config, backend="torch").run(2, tmp_path / "npy", sample_format="npy")
    assert [p.name for p in run.files] == ["ct_00000.npy", "ct_00001.npy"] and run.manifest[
        "file_scale"
    ] == 1.0
    np.testing.assert_array_equal(np.load(run.files[0]), memory[0].numpy())
    np.testing.assert_array_equal(
        next(invcoss.inversion.files.read_samples(run.files, 2, run.manifest)), memory
    )
    # a folder written before file_scale existed (CT as HU/1024): read with a scale of 1
    old = {k: v for k, v in run.manifest.items() if k not in ("file_scale", "sample_format", "file_values")}
    invcoss.data.write_nifti(tmp_path / "old.nii.gz", memory[0, 0].numpy(), (1.0, 1.0, 1.0), np.float32)
    np.testing.assert_array_equal(
        next(invcoss.inversion.files.read_samples([tmp_path / "old.nii.gz"], 1, old))[0], memory[0]
    )
    with pytest.raises(ValueError, match="nifti, npy, dicom for 3D samples, got 'png'"):
        Inverter(model, ct_stats, config, backend="torch").run(2, tmp_path / "png", sample_format="png")
    with pytest.raises(RunFolderError, match="its samples are npy"):
        Inverter(model, ct_stats, config, backend="torch").run(
            2, tmp_path / "npy", resume=True, sample_format="nifti"
        )
    xray = InversionConfig(
        modality="xray", batch_size=2, min_batch_size=1, steps=1, warmup_steps=1, generator_every=1, latent_dim=8,
        generator_channels=(8, 8, 4),
    )  # fmt: skip
    stats = _stats(model, "xray")
    images = Inverter(model, stats, xray, backend="torch").generate(2).images
    run = Inverter(model, stats, xray, backend="torch").run(2, tmp_path / "xpng", sample_format="png")
    assert [p.name for p in run.files] == ["xray_00000.png", "xray_00001.png"]
    assert not (tmp_path / "xpng" / "png").exists()
    back = next(invcoss.inversion.files.read_samples(run.files, 2, run.manifest))
    assert back.shape == images.shape and (back - images).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding


def test_dicom_series_hold_the_nifti_values_and_geometry(tmp_path, model, ct_stats):
    pydicom = pytest.importorskip("pydicom")
    config = ct_config(batch_size=2, steps=1, warmup_steps=1)
    nifti = Inverter(model, ct_stats, config, backend="torch").run(2, tmp_path / "nii")
    run = Inverter(model, ct_stats, config, backend="torch").run(2, tmp_path / "dcm", sample_format="dicom")
    assert [p.name for p in run.files] == ["ct_00000", "ct_00001"] and run.manifest["file_scale"] == 1024.0
    img = nib.load(nifti.files[0])
    hu = read_nifti(nifti.files[0]).array
    slices = sorted(run.files[0].iterdir())
    assert len(slices) == 16
    first, last = pydicom.dcmread(slices[0]), pydicom.dcmread(slices[-1])
    assert first.Modality == "CT" and list(first.ImageType) == ["DERIVED", "SECONDARY"]
    assert first.PatientName == "SYNTHETIC^INVCOSS" and "not a patient scan" in first.SeriesDescription
    assert first.SeriesInstanceUID == last.SeriesInstanceUID and first.SOPInstanceUID != last.SOPInstanceUID
    # geometry: the NIfTI affine (RAS) of voxel (k, H-1, W-1), in LPS, is each slice's position
    h, w = hu.shape[1:]
    for k, ds in ((0, first), (15, last)):
        ras = img.affine @ np.array([w - 1, h - 1, k, 1.0])
        np.testing.assert_allclose(
            np.asarray(ds.ImagePositionPatient, float), ras[:3] * [-1, -1, 1], atol=1e-4
        )
    assert [float(v) for v in first.PixelSpacing] == pytest.approx(read_nifti(nifti.files[0]).spacing[1:])
    # values: HU to within half a RescaleSlope step; in model space through read_samples
    vol = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.abs(vol[::-1, ::-1] - hu[0]).max() <= float(first.RescaleSlope) / 2
    back = next(invcoss.inversion.files.read_samples(run.files, 2, run.manifest))
    expected = next(invcoss.inversion.files.read_samples(nifti.files, 2, nifti.manifest))
    assert (back - expected).abs().max() <= 1 / 32 / 1024 + 1e-7
    assert files_of(tmp_path / "dcm") == files_of(
        Inverter(model, ct_stats, config, backend="torch")
        .run(2, tmp_path / "dcm2", sample_format="dicom")
        .out_dir
    )  # the same samples give the same bytes, UIDs included


def test_same_seed_same_bytes_other_seed_other_samples(tmp_path, model, ct_stats):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        Inverter(model, ct_stats, ct_config(seed=seed), backend="torch").run(3, tmp_path / name)
    a, b, c = (files_of(tmp_path / n) for n in "abc")
    assert a == b
    assert sorted(a) == sorted(c) and all(a[k] != c[k] for k in a)


def test_resume_after_an_interrupt_mid_batch(tmp_path, model, ct_stats):
    Inverter(model, ct_stats, ct_config(), backend="torch").run(5, tmp_path / "whole")

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out, on_step=interrupt_at(1))
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["batches"]) == 1 and not m["complete"]
    assert (out / m["resume_state"]).is_file()
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "samples").iterdir()}
    assert sorted(first) == ["ct_00000.nii.gz", "ct_00001.nii.gz"]
    with pytest.raises(RunFolderError, match="--resume"):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out)
    # A truncated resume state is named, not read.
    state = out / m["resume_state"]
    whole_state = state.read_bytes()
    state.write_bytes(whole_state[:-16])
    with pytest.raises(RunFolderError, match="truncated or padded"):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out, resume=True)
    state.write_bytes(whole_state)
    result = Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out, resume=True)
    assert result.batches_run == 2
    assert files_of(out) == files_of(tmp_path / "whole")  # same files, same bytes, no state left
    for name, stamp in first.items():  # finished batches are never rewritten
        p = out / "samples" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    again = Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out, resume=True)
    assert again.batches_run == 0 and files_of(out) == files_of(tmp_path / "whole")


def test_resume_after_a_kill_while_writing_a_batch(tmp_path, model, ct_stats, monkeypatch):
    Inverter(model, ct_stats, ct_config(), backend="torch").run(5, tmp_path / "whole")
    out = tmp_path / "cut"
    real_write, calls = invcoss.data.write_nifti, []

    def dying_write(path, *args, **kw):
        calls.append(path)
        if len(calls) == 4:  # the second file of batch 1: leave a half-written temporary file, die
            (path.parent / f".{path.name}.x1y2.tmp").write_bytes(b"\x1f\x8b half")
            raise KeyboardInterrupt
        return real_write(path, *args, **kw)

    monkeypatch.setattr(invcoss.inversion.files, "write_nifti", dying_write)
    with pytest.raises(KeyboardInterrupt):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out)
    monkeypatch.setattr(invcoss.inversion.files, "write_nifti", real_write)
    assert len(json.loads((out / "manifest.json").read_text())["batches"]) == 1
    assert (out / "samples" / "ct_00002.nii.gz").is_file()  # written, but its batch is unfinished
    Inverter(model, ct_stats, ct_config(), backend="torch").run(5, out, resume=True)
    assert files_of(out) == files_of(tmp_path / "whole")
    assert not list(out.rglob("*.tmp"))


def test_resume_refuses_another_configuration(tmp_path, model, ct_stats):
    out = tmp_path / "run"
    Inverter(model, ct_stats, ct_config(), backend="torch").run(2, out)
    before = files_of(out)
    with pytest.raises(RunFolderError, match=r"config\.seed"):
        Inverter(model, ct_stats, ct_config(seed=3), backend="torch").run(2, out, resume=True)
    with pytest.raises(RunFolderError, match="num_samples"):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(3, out, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    with pytest.raises(RunFolderError, match="not empty"):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(2, tmp_path / "other")
    assert files_of(out) == before and sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_resume_names_the_step_settings_a_run_was_made_with(tmp_path, model, ct_stats):
    from invcoss.inversion.step import FORMER_STEP, STEP_FIELDS

    out = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        Inverter(model, ct_stats, ct_config(adam="foreach"), backend="torch").run(
            4, out, on_step=interrupt_at(1)
        )
    with pytest.raises(RunFolderError, match=r"config\.adam differ.*ran its steps with --set adam=foreach$"):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(4, out, resume=True)
    # A folder from before the step fields: it ran the former step, and resumes with it.
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for k in STEP_FIELDS:
        del manifest["identity"]["config"][k]
    path.write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError) as e:
        Inverter(model, ct_stats, ct_config(), backend="torch").run(4, out, resume=True)
    assert "--set compile_mode=off --set precision=fp32 --set memory_format=contiguous" in str(e.value)
    assert str(e.value).endswith("--set adam=for-loop --set sync_every=1 --set share_tokens=false")
    assert (
        Inverter(model, ct_stats, ct_config(**FORMER_STEP), backend="torch")
        .run(4, out, resume=True)
        .batches_run
        == 1
    )


def test_a_non_finite_loss_stops_the_batch_and_writes_none_of_it(tmp_path, model, ct_stats):
    inv = Inverter(model, ct_stats, ct_config(), backend="torch")

    def poison(result) -> None:  # after batch 0 is written, the statistics become infinite
        inv.targets[0] = (inv.targets[0][0], torch.full_like(inv.targets[0][1], float("inf")))

    with pytest.raises(NonFiniteLossError, match=r"batch 1, step 1/2: the loss is not finite.*norm=inf"):
        inv.run(4, tmp_path, on_batch=poison)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert len(m["batches"]) == 1
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["ct_00000.nii.gz", "ct_00001.nii.gz"]
    assert len(inv.pool) == 2  # the failed batch pushed nothing into the pool


def test_the_manifest_records_the_thread_count_and_resume_needs_the_same(tmp_path, model, ct_stats):
    out = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(4, out, on_step=interrupt_at(1))
    m = json.loads((out / "manifest.json").read_text())
    assert m["compute"]["threads"] == torch.get_num_threads() == 1
    torch.set_num_threads(2)
    try:
        with pytest.raises(
            RunFolderError, match=r"made with 1 CPU threads and this process has 2.*--threads 1"
        ):
            Inverter(model, ct_stats, ct_config(), backend="torch").run(4, out, resume=True)
    finally:
        torch.set_num_threads(1)
    assert len(json.loads((out / "manifest.json").read_text())["batches"]) == 1  # nothing more was done
    assert Inverter(model, ct_stats, ct_config(), backend="torch").run(4, out, resume=True).batches_run == 1


def test_a_run_killed_in_its_first_batch_is_resumed(tmp_path, model, ct_stats):
    """The manifest exists from the start: a kill before any batch finished leaves a run to resume."""
    Inverter(model, ct_stats, ct_config(), backend="torch").run(3, tmp_path / "whole")

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(3, out, on_step=interrupt_at(0))
    assert json.loads((out / "manifest.json").read_text())["batches"] == []
    with pytest.raises(RunFolderError, match=r"already holds an inversion run \(0 of 2 batches done\)"):
        Inverter(model, ct_stats, ct_config(), backend="torch").run(3, out)
    assert Inverter(model, ct_stats, ct_config(), backend="torch").run(3, out, resume=True).batches_run == 2
    assert files_of(out) == files_of(tmp_path / "whole")
