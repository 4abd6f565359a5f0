"""With --hash-names, no written file of an end-to-end NIfTI/PNG run (preprocess, stats, invert with
the cache as reference, audit) holds a patient name planted in the source file names."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from invcoss.cli import main
from invcoss.data import write_phantoms

PLANTED = ("DOE_JOHN", "MUSTERMANN_ERIKA")


def _files_holding(root, needles) -> list[str]:
    hits = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        blob = p.read_bytes()
        if p.suffix == ".gz":
            blob += gzip.decompress(blob)
        text = (p.relative_to(root).as_posix().encode() + blob).lower()
        hits += [f"{p.relative_to(root)}: {n}" for n in needles if n.lower().encode() in text]
    return hits


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["xray", "ct"])
def test_no_planted_name_in_any_written_file(tmp_path, modality):
    src = tmp_path / "src"
    write_phantoms(tmp_path / "raw", modality, 2, size=(64, 64) if modality == "xray" else (24, 64, 64))
    src.mkdir()
    for name, p in zip(PLANTED, sorted((tmp_path / "raw").iterdir())):
        shutil.copy(p, src / f"{name}_{p.name}")
    run = CliRunner()
    out = tmp_path / "out"

    def ok(*args):
        r = run.invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    logs = ok("preprocess", "--modality", modality, "--data", src, "--out", out / "cache", "--profile", "quick",
              "--hash-names", "--threads", "1")  # fmt: skip
    from invcoss.assets import default_model_dir

    model = default_model_dir(modality)
    logs += ok("stats", "--checkpoint", model, "--data", out / "cache", "--out", out / "stats.safetensors",
               "--threads", "1")  # fmt: skip
    logs += ok("invert", "--modality", modality, "--out", out / "inv", "--num-samples", "2", "--batch-size", "2",
               "--steps", "2", "--warmup-steps", "3", "--reference", out / "cache", "--threads", "1")  # fmt: skip
    logs += ok("audit", out / "inv", out / "cache", "--stats", out / "stats.safetensors", "--out", out / "audit",
               "--threads", "1")  # fmt: skip
    assert (out / "inv" / "manifest.json").is_file() and (out / "audit" / "audit.json").is_file()
    assert _files_holding(out, PLANTED) == [] and not any(n.lower() in logs.lower() for n in PLANTED)
    # Without the option the names are in the cache: the scan above can find them.
    ok("preprocess", "--modality", modality, "--data", src, "--out", tmp_path / "plain", "--profile", "quick",
       "--threads", "1")  # fmt: skip
    assert _files_holding(tmp_path / "plain", PLANTED)


PATIENTS = [
    {
        "PatientName": "DOE^JOHN", "PatientID": "PID7734DOE", "PatientBirthDate": "19610412",
        "AccessionNumber": "ACC99881", "InstitutionName": "ST ELSEWHERE HOSPITAL",
        "ReferringPhysicianName": "HOUSE^GREGORY",
    },
    {
        "PatientName": "ROE^JANE", "PatientID": "PID5521ROE", "PatientBirthDate": "19790923",
        "AccessionNumber": "ACC12077", "InstitutionName": "ST ELSEWHERE HOSPITAL",
        "ReferringPhysicianName": "QUINN^MICHAELA",
    },
]  # fmt: skip
FOLDERS = ("DOE_JOHN", "ROE_JANE")
SERIES_UIDS = ("1.2.826.0.1.3680043.8.498.77341", "1.2.826.0.1.3680043.8.498.55212")


def _planted_dicom_series(tmp_path):
    """Two CT phantoms written as DICOM series in folders named after their patients, files named
    after them too, each slice carrying planted patient fields; returns the archive folder."""
    pydicom = pytest.importorskip("pydicom")
    from invcoss.data import read_nifti
    from tests.data.dicom_files import write_series

    niftis = write_phantoms(tmp_path / "raw", "ct", 2, size=(24, 64, 64))
    for nifti, fields, name, uid in zip(niftis, PATIENTS, FOLDERS, SERIES_UIDS):
        volume = read_nifti(nifti)
        stored = np.round(volume.array + 1024).clip(0, 4095).astype(np.int16)  # HU = stored - 1024
        sd, sh, sw = volume.spacing
        folder = tmp_path / "archive" / name
        paths = write_series(
            folder, stored, spacing=(sh, sw), steps=[sd] * (stored.shape[0] - 1), intercept=-1024.0,
            series_uid=uid,
        )  # fmt: skip
        for p in paths:
            ds = pydicom.dcmread(p)
            for key, value in fields.items():
                setattr(ds, key, value)
            ds.save_as(folder / f"{name}_{p.name}", enforce_file_format=True)
            p.unlink()
    return tmp_path / "archive"


@pytest.mark.slow
def test_no_dicom_patient_field_in_any_written_file(tmp_path):
    src = _planted_dicom_series(tmp_path)
    run = CliRunner()
    out = tmp_path / "out"

    def ok(*args):
        r = run.invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    fields = tuple(v for p in PATIENTS for v in p.values())
    logs = ok("preprocess", "--modality", "ct", "--data", src, "--out", out / "cache", "--profile", "quick",
              "--hash-names", "--threads", "1")  # fmt: skip
    from invcoss.assets import default_model_dir

    model = default_model_dir("ct")
    logs += ok("stats", "--checkpoint", model, "--data", out / "cache", "--out", out / "stats.safetensors",
               "--threads", "1")  # fmt: skip
    logs += ok("invert", "--modality", "ct", "--out", out / "inv", "--num-samples", "2", "--batch-size", "2",
               "--steps", "2", "--warmup-steps", "3", "--reference", out / "cache", "--threads", "1")  # fmt: skip
    logs += ok("audit", out / "inv", out / "cache", "--stats", out / "stats.safetensors", "--out", out / "audit",
               "--threads", "1")  # fmt: skip
    assert (out / "audit" / "audit.json").is_file()
    needles = (*fields, *FOLDERS, *SERIES_UIDS)
    assert _files_holding(out, needles) == [] and not any(n.lower() in logs.lower() for n in needles)
    # Without the option the folder and file names (the user's) are recorded, the series too, but
    # still no patient field of the headers: the scan can find what is there.
    ok("preprocess", "--modality", "ct", "--data", src, "--out", tmp_path / "plain", "--profile", "quick",
       "--threads", "1")  # fmt: skip
    plain = _files_holding(tmp_path / "plain", needles)
    assert any("DOE_JOHN" in h for h in plain)
    assert not any(h.endswith(f": {f}") for h in plain for f in fields)
