"""With --hash-names, no written file of an end-to-end NIfTI/PNG run (preprocess, stats, invert with
the cache as reference, audit) holds a patient name planted in the source file names."""

from __future__ import annotations

import gzip
import shutil

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
