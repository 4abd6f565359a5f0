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

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from invcoss import distributed
from invcoss.rng import derive_seed

__all__ = [
    "CURRENT",
    "Step",
    "TrainStep",
    "TrainingSchedule",
    "global_batches",
    "parallel_loss",
    "sample_mask_noise",
    "train_epoch",
]

CURRENT = "current"  # the source of a batch of the stage's own data


@dataclass(frozen=True)
class TrainingSchedule:
    """The optimisation settings every MAE training shares (paper values by default).

    :class:`~invcoss.pretrain.PretrainConfig` and :class:`~invcoss.continual.ContinualConfig`
    both extend it, so each field is declared and validated once.

    Attributes:
        epochs: total epochs (per stage in continual training).
        batch_size: samples per step.
        lr: peak learning rate, reached at the end of the warm-up.
        min_lr: learning rate at the end of the cosine decay.
        warmup_epochs: linear warm-up length; None means 40/300 of ``epochs`` as in the paper.
        weight_decay, betas: AdamW (MAE's 0.05 and (0.9, 0.95)).
        mask_ratio: fraction of patches hidden (0.75).
        amp: bf16 autocast on CUDA (ignored on CPU).
        num_workers: DataLoader workers.
    """

    epochs: int = 300
    batch_size: int = 512
    lr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_epochs: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = 0.75
    amp: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def warmup(self) -> float:
        """The warm-up length in epochs (``warmup_epochs``, or 40/300 of ``epochs``)."""
        return self.epochs * 40 / 300 if self.warmup_epochs is None else float(self.warmup_epochs)

    def schedule(self) -> TrainingSchedule:
        """Just the shared settings (what a training loop needs of either config)."""
        return TrainingSchedule(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingSchedule)}
        )


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


def sample_mask_noise(seed: int, samples: Sequence[int], length: int, device=None) -> Tensor:
    """``(B, L)`` MAE mask scores, row ``i`` from its own generator seeded by ``(seed, samples[i])``.

    A sample's mask depends on the seed (e.g. of the epoch) and the sample's key (its index) only,
    not on the batch it lands in: splitting a batch across ranks, or resuming with another number
    of ranks, hides the same patches of every sample.

    Example:
        >>> a = sample_mask_noise(7, [3, 5], 4)
        >>> torch.equal(a[1], sample_mask_noise(7, [5], 4)[0]), tuple(a.shape)
        (True, (2, 4))
    """
    rows = [
        torch.rand(length, generator=torch.Generator().manual_seed(derive_seed(seed, "sample", int(i))))
        for i in samples
    ]
    return torch.stack(rows).to(device)


def global_batches(order: Sequence[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    """``order`` cut into batches of ``batch_size`` (the last one ragged unless ``drop_last``).

    Example:
        >>> global_batches([4, 0, 3, 1, 2], 2, False), global_batches([4, 0, 3, 1, 2], 2, True)
        ([[4, 0], [3, 1], [2]], [[4, 0], [3, 1]])
    """
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    return [b for b in batches if len(b) == batch_size] if drop_last else batches


def _touch_parameters(model: nn.Module) -> Tensor:
    # A rank whose part of a global batch is empty still joins DDP's gradient all-reduce, with zeros.
    return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))


def parallel_loss(
    run: Callable, fn: Callable, args: tuple | None, local: int, total: int
) -> tuple[Tensor, dict[str, float]]:
    """The loss and parts of this rank's ``local`` samples of a global batch of ``total``.

    ``fn(model, *args) -> (loss, parts)`` is computed through ``run``
    (:func:`invcoss.distributed.data_parallel`); ``args`` None means an empty part. Under a process
    group the loss is scaled by ``local * world / total``, so that DDP's average of the ranks'
    gradients is the gradient of the global batch's mean loss (uneven parts included), and each part
    becomes its global mean (the ``local / total`` weighted sum over ranks). One process: ``fn``'s
    result as it is.
    """
    loss, parts = run(_touch_parameters) if args is None else run(fn, *args)
    if not distributed.is_initialized():
        return loss, parts
    merged: dict[str, float] = {}
    for n, p in distributed.all_gather_object((local, parts)):
        for k, v in p.items():
            merged[k] = merged.get(k, 0.0) + v * n / total
    return loss * (local * distributed.world_size() / total), merged


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
