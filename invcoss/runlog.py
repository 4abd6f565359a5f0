"""The per-step log of a long run: ``metrics.jsonl`` in the run's folder, optionally TensorBoard.

``pretrain``, ``continual``, ``invert`` and ``experiment forgetting`` write one JSON object per line
as the run goes, each line flushed when written (``tail -f`` and a crash keep every finished
step); a resumed run appends to the file, a fresh one replaces it. Every line has

- ``event``: what the line is: ``step`` (one optimisation step), ``epoch`` (the mean of an epoch's
  steps), ``batch`` (a written inversion batch), ``stage`` (a finished continual stage);
- ``time`` (Unix seconds) and ``elapsed_s`` (seconds since this process opened the log);
- ``step`` (``step``, ``epoch`` and ``batch`` lines): the run's step count at that line (within a
  stage for a continual run; it continues across a resume);
- ``losses``: ``{name: value}``, and where they apply ``lr``, ``samples_per_s``, ``steps_per_s``,
  ``epoch``, ``stage``, ``modality``, ``batch``, ``method``, ``seed``.

The file and the TensorBoard folder are created at the first line, so a run that is refused before
it starts (an occupied folder) leaves nothing behind. Under ``torch.distributed`` only rank 0
writes. Each line is also logged on the ``invcoss.runlog`` logger (``epoch``, ``batch`` and
``stage`` lines at INFO, ``step`` lines at DEBUG), so ``invcoss-cli -v`` shows them in a CI log.

Example:
    >>> import tempfile, pathlib, json
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> with MetricsLog(run) as log:
    ...     _ = log.write("step", step=1, losses={"mae": 0.5}, lr=1e-4)
    >>> json.loads((run / METRICS_NAME).read_text())["losses"]
    {'mae': 0.5}
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any

__all__ = [
    "METRICS_NAME",
    "TENSORBOARD_DIR",
    "MetricsLog",
    "json_finite",
    "read_metrics",
    "tensorboard_available",
]

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

logger = logging.getLogger(__name__)

_SUMMARY_EVENTS = ("epoch", "batch", "stage")


def tensorboard_available() -> bool:
    """Whether TensorBoard event files can be written here (the ``tensorboard`` package)."""
    return importlib.util.find_spec("tensorboard") is not None


def _is_writer_rank() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return True
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def json_finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None (JSON has neither), through dicts and lists.

    Example:
        >>> json_finite({"loss": float("nan"), "lr": [1.0, float("inf")]})
        {'loss': None, 'lr': [1.0, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


class MetricsLog:
    """Writes ``folder/metrics.jsonl`` (and TensorBoard events under ``folder/tensorboard``).

    Args:
        folder: the run's output folder.
        resume: append to an existing log instead of replacing it.
        tensorboard: also write TensorBoard scalars (every loss, ``lr`` and the throughputs).
        enabled: write at all; None means on rank 0 of a ``torch.distributed`` job (or alone),
            decided at the first line (the process group may be set up after the log is made).

    Raises:
        RuntimeError: ``tensorboard`` is asked for and the package is not installed.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        resume: bool = False,
        tensorboard: bool = False,
        enabled: bool | None = None,
    ) -> None:
        if tensorboard and not tensorboard_available():
            raise RuntimeError("TensorBoard logging needs the tensorboard package: pip install tensorboard")
        self.path = Path(folder) / METRICS_NAME
        self.resume = resume
        self.tensorboard = tensorboard
        # None: decided at the first line, after a command has set up its process group.
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._writer = None
        self._t0 = time.time()

    def write(self, event: str, **fields: Any) -> dict:
        """Append one line ``{"event": event, "time", "elapsed_s", **fields}`` and flush it; returns it."""
        now = time.time()
        record = json_finite(
            {"event": event, "time": round(now, 3), "elapsed_s": round(now - self._t0, 3), **fields}
        )
        level = logging.INFO if event in _SUMMARY_EVENTS else logging.DEBUG
        if logger.isEnabledFor(level):
            logger.log(level, "%s %s", event, _brief(fields))
        if self.enabled is None:
            self.enabled = _is_writer_rank()
        if not self.enabled:
            return record
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if self.resume else "w", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self.tensorboard:
            self._scalars(record)
        return record

    def _scalars(self, record: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR))
        step = record.get("step", 0)
        prefix = "/".join(str(record[k]) for k in ("method", "modality") if record.get(k) is not None)
        prefix = f"{prefix}/" if prefix else ""
        values = {f"{record['event']}/{k}": v for k, v in (record.get("losses") or {}).items()}
        for key in ("lr", "samples_per_s", "steps_per_s"):
            if record.get(key) is not None:
                values[f"{record['event']}/{key}"] = record[key]
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(prefix + tag, value, step, walltime=record["time"])

    def close(self) -> None:
        """Close the file and the TensorBoard writer (both are flushed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _brief(fields: dict) -> str:
    parts = []
    for k, v in fields.items():
        if isinstance(v, dict):
            parts += [f"{n} {x:.4g}" if isinstance(x, float) else f"{n} {x}" for n, x in v.items()]
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return " ".join(parts)


def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """Every line of ``folder/metrics.jsonl`` (a half-written last line, from a kill, is left out).

    Raises:
        FileNotFoundError: the folder has no ``metrics.jsonl``.
    """
    path = Path(folder) / METRICS_NAME
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
