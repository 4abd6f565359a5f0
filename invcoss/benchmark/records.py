"""JSON-lines records: each result is appended as one line the moment it exists.

A time-limited run (the GPU check) may be killed at any moment. Writing one complete line per test
outcome, benchmark row or roof, flushed and synced at once, means a kill loses at most the record
in flight; :func:`read_records` skips a last line cut off mid-write, so whatever came back can
always be rendered (:mod:`invcoss.benchmark.report`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

# The files of a GPU check folder, by what they hold. Together with gpu_check.log and report.md
# they are all the check writes (a lent machine gives back at most eight files).
FILES = {
    "meta": "meta.jsonl",  # one line per step: the machine, versions, backends, the step's exit
    "tests": "tests.jsonl",  # one line per test outcome (steps warm and tests) and per warm job
    "roofs": "roofs.jsonl",  # one line per measured roof
    "bench": "bench.jsonl",  # one line per benchmark row (:class:`invcoss.benchmark.Row` fields)
    "inversion": "inversion.jsonl",  # one line per inversion-step row
}


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` and make it durable before returning.

    One ``write`` of a complete line on a file opened for appending: concurrent writers (the warm
    step's processes) interleave whole lines, never parts of them.
    """
    line = json.dumps(record, default=_jsonable, allow_nan=True) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of ``path`` (empty when it does not exist); a line cut off by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line in flight when the writer was killed
        if isinstance(record, dict):
            out.append(record)
    return out


def records_of(folder: str | os.PathLike, kind: str, **match: object) -> list[dict]:
    """Records of kind ``kind`` (a key of :data:`FILES`) in ``folder`` whose fields equal ``match``."""
    rows = read_records(Path(folder) / FILES[kind])
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Iterable):
        return list(value)
    return repr(value)
