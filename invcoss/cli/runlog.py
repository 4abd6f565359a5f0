"""The long commands' side of :mod:`invcoss.runlog`: ``--tensorboard`` and what one line holds.

``pretrain``, ``continual``, ``invert`` and ``experiment forgetting`` open a
:class:`~invcoss.runlog.MetricsLog` on their output folder with :func:`metrics_log` and feed it from
the progress callbacks they already have, so the library's training loops stay as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click

from invcoss.cli.options import UserError


def tensorboard_option(f: Callable) -> Callable:
    """``--tensorboard``: also write TensorBoard event files into OUT/tensorboard."""
    return click.option(
        "--tensorboard",
        is_flag=True,
        help="Also write TensorBoard event files to OUT/tensorboard (needs the tensorboard package).",
    )(f)


def metrics_log(out: Path, resume: bool, tensorboard: bool):
    """The run log of ``out`` (appended to on ``resume``); a UserError when ``--tensorboard`` cannot work."""
    from invcoss.runlog import MetricsLog

    try:
        return MetricsLog(out, resume=resume, tensorboard=tensorboard)
    except RuntimeError as e:
        raise UserError(f"--tensorboard: {e}") from None


def log_train_step(log, s, epoch_losses: dict[str, list[float]], step_offset: int = 0, **fields) -> None:
    """A ``step`` line for the :class:`~invcoss.training.TrainStep` ``s``, and after the last step
    of an epoch an ``epoch`` line with, per loss, the mean over the epoch's steps that have it
    (``epoch_losses`` collects them and is emptied there). ``step_offset``: steps of earlier stages."""
    step = step_offset + s.done
    common = {"epoch": s.epoch, "epochs": s.epochs, **fields}
    log.write(
        "step", step=step, phase="train", lr=s.lr, samples_per_s=s.samples_per_s, losses=dict(s.losses),
        source=s.source, **common,
    )  # fmt: skip
    for name, value in s.losses.items():
        epoch_losses.setdefault(name, []).append(value)
    if s.step == s.steps:
        means = {name: sum(v) / len(v) for name, v in epoch_losses.items()}
        log.write("epoch", step=step, phase="train", lr=s.lr, losses=means, **common)
        epoch_losses.clear()


class StepRate:
    """Steps per second between consecutive calls (None for the first, and when ``restart``: the
    first step of a batch, whose time since the last includes writing the previous batch)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def __call__(self, restart: bool = False) -> float | None:
        now = time.perf_counter()
        rate = None if self._last is None or restart else 1.0 / max(now - self._last, 1e-9)
        self._last = now
        return rate


def log_continual_event(log, e, epoch_losses: dict[str, list[float]], rate: StepRate, **fields) -> None:
    """The lines of one :class:`~invcoss.continual.ContinualEvent` ``e``: a ``step`` (and ``epoch``)
    line per training step, a ``step`` line per inversion step (``phase`` ``invert``), a ``stage``
    line when a stage ends. ``step`` counts within the stage."""
    where = {"stage": e.stage + 1, "modality": e.modality, **fields}
    if e.kind == "train":
        log_train_step(log, e.step, epoch_losses, **where)
    elif e.kind == "invert":
        i = e.info
        loss = i.get("loss")
        log.write(
            "step", step=i["step"], phase="invert", source=i["source"], batch=i["batch"] + 1,
            batches=i["batches"], steps=i["steps"], steps_per_s=rate(restart=i["step"] == 1),
            losses={"total": loss} if loss is not None else {}, **where,
        )  # fmt: skip
    elif e.kind == "stage_end":
        summary = e.info.get("summary", {})
        log.write(
            "stage", samples=summary.get("samples"), buffer=summary.get("buffer"), seconds=summary.get("seconds"),
            losses=(summary.get("history") or [{}])[-1], **where,
        )  # fmt: skip
