"""``invcoss-cli audit`` end to end at tiny sizes: a copy of the training data is flagged in full, bad
input exits 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from invcoss.cli import main
from invcoss.data import preprocess, write_phantoms


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    out = {}
    for name, seed, n in (("train", 0, 6), ("held", 1, 6)):
        src = root / f"{name}-src"
        write_phantoms(src, "xray", n, size=(64, 64), seed=seed)
        preprocess(src, root / name, "xray", "quick")
        out[name] = root / name
    return root, out


def test_cli_audit_flags_a_copy_of_the_training_data(caches):
    root, c = caches
    r = CliRunner().invoke(
        main, ["audit", str(c["train"]), str(c["train"]), "--heldout", str(c["held"]), "--out", str(root / "a"),
               "--threads", "1"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((root / "a" / "audit.json").read_text())
    assert report["memorisation"]["pixels"]["score"] == 1.0
    assert report["memorisation"]["features"]["score"] == 1.0
    assert report["statistics"]["count"] > 0
    assert (root / "a" / "closest_pairs.png").is_file()
    assert "memorisation" in r.output


def test_cli_audit_bad_input(caches):
    root, c = caches
    r = CliRunner().invoke(
        main, ["audit", str(root / "missing"), str(root / "missing2"), "--modality", "xray"]
    )
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["audit", str(c["train"]), str(c["train"]), "--percentile", "0"])
    assert r.exit_code == 2 and "--percentile" in r.output
