"""Fuzzing the readers and ``preprocess`` with mutated NIfTI / PNG / TIFF / DICOM files under a memory cap.

``fuzz_worker.py`` (beside this file) writes seeded mutations of small valid files and runs them in
a subprocess whose address space is capped at what it uses after its imports plus ``CAP_MB``; an
input whose header claims sizes or lengths the file does not hold gets only ``CLAIM_MB`` (an eighth
of the cap) above what is in use before it. Each input must be read or skipped with a reason and a
kind (:class:`~invcoss.data.ReadError`); a crash of any other type, an allocation past the cap or
the claim budget, a file lost by ``preprocess`` or more than 20 s on one input is a failure naming
the input. ``preprocess`` runs with :class:`~invcoss.data.ReadLimits` sized to the cap, the readers
alternately with those and the defaults. The default run tries ``FAST`` inputs in a few seconds;
the ``slow`` one ``SLOW``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from invcoss.data.limits import OVER_LIMIT, SKIP_KINDS, UNREADABLE

WORKER = Path(__file__).with_name("fuzz_worker.py")
CLAIMS = ("header field", "size claim")  # fuzz_worker.CLAIMS: mutations that claim sizes
CAP_MB = 384
CLAIM_MB = CAP_MB // 8
FAST = (300, 40)  # (inputs to the readers, inputs to preprocess)
SLOW = (3000, 300)


def run_fuzz(folder: Path, reads: int, preprocesses: int, seed: int) -> dict:
    result = folder / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(folder),
            str(reads),
            str(preprocesses),
            str(seed),
            str(CAP_MB),
            str(CLAIM_MB),
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0 or not result.exists():
        current = folder / "work" / "current"
        last = current.read_text() if current.exists() else "before the first input"
        pytest.fail(f"the fuzz worker died (exit {proc.returncode}) on {last}: {proc.stderr[-2000:]}")
    return json.loads(result.read_text())


def failures(result: dict, mode: str) -> list[str]:
    return [
        f"{o['input']}: {o['outcome']}: {o['detail']}"
        for o in result["outcomes"]
        if o["mode"] == mode and o["outcome"] not in ("read", "skipped")
    ]


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> dict:
    return run_fuzz(tmp_path_factory.mktemp("fuzz"), *FAST, seed=0)


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> dict:
    return run_fuzz(tmp_path_factory.mktemp("fuzz-slow"), *SLOW, seed=1000)


def summary(result: dict) -> str:
    """Outcomes by mode and, for skipped inputs, by ReadError kind."""
    counts = collections.Counter(
        (o["mode"], o["kind"] if o["outcome"] == "skipped" else o["outcome"]) for o in result["outcomes"]
    )
    claims = [o["rss_mb"] for o in result["outcomes"] if o["mutation"] in CLAIMS]
    return (
        f"fuzz: {result['inputs']} inputs in {result['seconds']:.1f} s, {dict(sorted(counts.items()))}; "
        f"peak RSS growth per input {max(o['rss_mb'] for o in result['outcomes']):.1f} MB, "
        f"{max(claims):.1f} MB over {len(claims)} header claims"
    )


def test_every_input_gets_an_outcome_and_both_paths_are_exercised(fast):
    assert fast["inputs"] == sum(FAST) == len(fast["outcomes"])
    counts = collections.Counter((o["mode"], o["outcome"]) for o in fast["outcomes"])
    # The mutations are neither all harmless nor all fatal: both outcomes occur on both paths.
    for mode in ("read", "preprocess"):
        assert counts[(mode, "read")] > 0 and counts[(mode, "skipped")] > 0, counts
    skipped = [o for o in fast["outcomes"] if o["outcome"] == "skipped"]
    assert all(o["detail"] and o["kind"] in SKIP_KINDS for o in skipped)
    # DICOM inputs (with the invcoss[dicom] extra) are among them, on both outcomes.
    if importlib.util.find_spec("pydicom") is not None:
        dicom = collections.Counter(o["outcome"] for o in fast["outcomes"] if o["input"].endswith(".dcm"))
        assert dicom["read"] > 0 and dicom["skipped"] > 0, dicom
    # Both the header checks (unreadable) and the limits (over a limit) reject inputs.
    kinds = collections.Counter(o["kind"] for o in skipped)
    assert kinds[UNREADABLE] > 0 and kinds[OVER_LIMIT] > 0, kinds
    print(summary(fast))


def test_readers_read_or_skip_every_input_within_the_cap(fast):
    assert not failures(fast, "read"), "\n".join(failures(fast, "read"))


def test_preprocess_accounts_for_every_input_within_the_cap(fast):
    assert not failures(fast, "preprocess"), "\n".join(failures(fast, "preprocess"))


def test_header_claims_are_rejected_far_below_the_cap(fast):
    """Inputs whose headers claim sizes the file does not hold ran with CLAIM_MB of address space:
    none failed (the tests above), and none grew the resident memory by more."""
    claims = [o for o in fast["outcomes"] if o["mutation"] in CLAIMS]
    assert {o["mode"] for o in claims} == {"read", "preprocess"}
    assert max(o["rss_mb"] for o in claims) < CLAIM_MB, max(claims, key=lambda o: o["rss_mb"])
    assert max(o["rss_mb"] for o in fast["outcomes"]) < CAP_MB


@pytest.mark.slow
def test_many_more_inputs(slow):
    assert slow["inputs"] == sum(SLOW)
    bad = failures(slow, "read") + failures(slow, "preprocess")
    assert not bad, f"{len(bad)} of {slow['inputs']} inputs failed:\n" + "\n".join(bad[:50])
    assert max(o["rss_mb"] for o in slow["outcomes"] if o["mutation"] in CLAIMS) < CLAIM_MB
    print(summary(slow))
