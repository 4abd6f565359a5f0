"""The one training epoch of invcoss: pre-training (:mod:`invcoss.pretrain`) and every continual
stage (:mod:`invcoss.continual.train`) step through :func:`train_epoch`.

A caller describes an epoch as a sequence of :class:`Step` s, each a batch ``source`` (``"current"``
for the stage's own data, a modality for a replay buffer), its size and a closure computing
``(loss, parts)``; :func:`train_epoch` sets the learning rate of the fractional epoch, computes
the loss, stops on a non-finite one, steps AdamW, accumulates the per-sample means of the parts,
and reports every step as a :class:`TrainStep`.

Example:
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> x = torch.ones(4, 2)
    >>> def mse():
    ...     loss = model(x).square().mean()
    ...     return loss, {"mse": float(loss.detach())}
    >>> means = train_epoch(model, opt, [Step("current", 4, mse)] * 3, epoch=0, epochs=1, lr_at=lambda e: 0.1)
    >>> sorted(means)
    ['mse']
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CURRENT", "Step", "TrainStep", "train_epoch"]

CURRENT = "current"  # the source of a batch of the stage's own data


@dataclass(frozen=True)
class Step:
    """One optimisation step of an epoch: where its batch comes from and how to compute its loss.

    Attributes:
        source: ``"current"`` or the modality of a replay buffer.
        size: samples in the batch (the weight of its parts in the epoch means).
        compute: ``() -> (loss, parts)``: the scalar loss to minimise and the named values to
            average (e.g. ``{"mae": ...}`` or ``{"distill": ..., "buffer_mae": ...}``).
    """

    source: str
    size: int
    compute: Callable[[], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainStep:
    """What a progress display or an audit receives after every training step (1-based counts)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    source: str
    lr: float
    losses: dict[str, float]
    samples_per_s: float

    @property
    def done(self) -> int:
        """Steps finished since the first epoch of the run, this one included."""
        return (self.epoch - 1) * self.steps + self.step

    @property
    def total(self) -> int:
        """Steps of the whole run (at this epoch's step count)."""
        return self.epochs * self.steps


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: Iterable[Step],
    *,
    epoch: int,
    epochs: int,
    lr_at: Callable[[float], float],
    num_steps: int | None = None,
    on_step: Callable[[TrainStep], None] | None = None,
    where: str = "training",
) -> dict[str, float]:
    """Run one epoch of ``steps`` (0-based ``epoch``) and return the per-sample mean of every part.

    The learning rate of step ``i`` is ``lr_at(epoch + i / num_steps)`` (``num_steps``: the
    length of ``steps`` when it has one).

    Raises:
        FloatingPointError: a loss became NaN or infinite (nothing of that step is applied).
    """
    if num_steps is None:
        num_steps = len(steps)  # type: ignore[arg-type]
    model.train()
    sums: dict[str, list[float]] = {}
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        lr = lr_at(epoch + i / num_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, parts = step.compute()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{where}: the loss became {value} at epoch {epoch + 1}, step {i + 1} ({step.source} batch); "
                "lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in parts.items():
            total, count = sums.get(k, (0.0, 0))
            sums[k] = [total + v * step.size, count + step.size]
        if on_step is not None:
            rate = step.size / max(time.perf_counter() - t0, 1e-9)
            on_step(TrainStep(epoch + 1, epochs, i + 1, num_steps, step.source, lr, parts, rate))
    return {k: s / n for k, (s, n) in sums.items()}
