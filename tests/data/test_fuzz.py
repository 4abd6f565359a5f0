"""Fuzzing the readers and ``preprocess`` with mutated NIfTI / PNG / TIFF files under a memory cap.

``fuzz_worker.py`` (beside this file) writes seeded mutations of small valid files and runs them in
a subprocess whose address space is capped at what it uses after its imports plus ``CAP_MB``. Each
input must be read or skipped with a reason (:class:`~invcoss.data.ReadError`); a crash of any
other type, an allocation past the cap, a file lost by ``preprocess`` or more than 20 s on one
input is a failure naming the input. The default run tries ``FAST`` inputs in a few seconds; the
``slow`` one ``SLOW``.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
CAP_MB = 384
FAST = (300, 40)  # (inputs to the readers, inputs to preprocess)
SLOW = (3000, 300)
# Found by this suite and left to the per-file isolation and header limits of issue 17 (readers.py,
# cache.py): Pillow's DecompressionBombError (and, in the slow run, a TypeError from a TIFF) escapes
# read_picture; headers claiming huge images make nibabel and Pillow allocate past the cap before the
# file is rejected; an infinite or huge pixdim crashes preprocess's resampling (OverflowError,
# TypeError). Strict: the marks must go when those land.
KNOWN = pytest.mark.xfail(
    strict=True,
    reason="issue 17: DecompressionBombError and allocations past the cap in the readers, "
    "OverflowError/TypeError from extreme spacing in preprocess (docs/data.md: Reliability)",
)


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


def test_every_input_gets_an_outcome_and_both_paths_are_exercised(fast):
    assert fast["inputs"] == sum(FAST) == len(fast["outcomes"])
    counts = collections.Counter((o["mode"], o["outcome"]) for o in fast["outcomes"])
    # The mutations are neither all harmless nor all fatal: both outcomes occur on both paths.
    for mode in ("read", "preprocess"):
        assert counts[(mode, "read")] > 0 and counts[(mode, "skipped")] > 0, counts
    assert all(o["detail"] for o in fast["outcomes"] if o["outcome"] == "skipped")
    print(f"fuzz: {fast['inputs']} inputs in {fast['seconds']:.1f} s, {dict(counts)}")


@KNOWN
def test_readers_read_or_skip_every_input_within_the_cap(fast):
    assert not failures(fast, "read"), "\n".join(failures(fast, "read"))


@KNOWN
def test_preprocess_accounts_for_every_input_within_the_cap(fast):
    assert not failures(fast, "preprocess"), "\n".join(failures(fast, "preprocess"))


@pytest.mark.slow
@KNOWN
def test_many_more_inputs(slow):
    assert slow["inputs"] == sum(SLOW)
    bad = failures(slow, "read") + failures(slow, "preprocess")
    assert not bad, f"{len(bad)} of {slow['inputs']} inputs failed:\n" + "\n".join(bad[:50])
