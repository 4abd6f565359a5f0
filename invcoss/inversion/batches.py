"""What an inversion run is made of: its plan of batches and what each batch gives back.

:func:`plan_batches` splits a run into batches whose batch statistics are meaningful;
:class:`BatchResult` is one optimised batch, :class:`GenerateResult` a whole run in memory,
:class:`StepInfo` what a progress display gets after each step. The engine that makes them is
:mod:`invcoss.inversion.engine` (which also exports these names).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["BatchResult", "GenerateResult", "NonFiniteLossError", "StepInfo", "plan_batches"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the batch is abandoned and nothing of it is written."""


@dataclass(frozen=True)
class StepInfo:
    """What a progress display shows after each step."""

    batch: int
    num_batches: int
    step: int
    steps: int
    losses: dict[str, float]


@dataclass
class BatchResult:
    """One optimised batch.

    Attributes:
        index: batch number.
        images: ``(B, C, *S)`` float32 CPU, in the model's input space.
        embeddings: ``(B, D)`` float32 CPU, ``model.embed`` of the images.
        curves: per step, ``step`` and every enabled term plus ``total``.
        final: every enabled term on the final images, with the mask of step 1 (so ``final[k]``
            and ``curves[k][0]`` measure the same thing before and after) and ``rep`` against the
            pool before this batch's push.
        stat_loss: sum over blocks of the stat-matching loss of the final images.
        noise_stat_loss: the same for random noise of the same batch size.
        fresh_generator: this batch started a new generator.
        seconds: wall time of the optimisation.
        compile_seconds: the part of ``seconds`` spent in steps that compiled the step for a new
            batch size (each such step's own work included; 0 when nothing compiled).
    """

    index: int
    images: Tensor
    embeddings: Tensor
    curves: dict[str, list[float]]
    final: dict[str, float]
    stat_loss: float
    noise_stat_loss: float
    fresh_generator: bool
    seconds: float
    compile_seconds: float = 0.0


@dataclass
class GenerateResult:
    """All batches of :meth:`InversionEngine.generate`, concatenated."""

    images: Tensor
    embeddings: Tensor
    batches: list[BatchResult] = field(default_factory=list)


def plan_batches(num_samples: int, batch_size: int, min_batch_size: int = 1) -> list[int]:
    """Split ``num_samples`` into batches whose batch statistics are meaningful.

    The rule: with ``b = max(batch_size, min_batch_size)``, take the fewest batches of at most
    ``b`` samples, ``k = ceil(N / b)``, with sizes as equal as possible (they differ by at most
    one, larger first). When that leaves a batch below ``min_batch_size`` (only possible when
    ``b < 2 * min_batch_size``), take ``k = N // min_batch_size`` batches instead: every batch then
    has at least ``min_batch_size`` samples and fewer than ``2 * min_batch_size``, so a batch may
    exceed ``batch_size`` (5 samples with ``batch_size`` 2 or 4 and a minimum of 4: one batch of 5).
    ``num_samples < min_batch_size`` gives a single batch of all of them and a warning: the
    samples can still be made, but their batch variance cannot match the target (at B = 1 it is
    constant, at B = 2 only an anti-symmetric pair matches it).

    Raises:
        ValueError: ``num_samples``, ``batch_size`` or ``min_batch_size`` below 1.

    Example:
        >>> plan_batches(10, 4, 1), plan_batches(10, 4, 4), plan_batches(5, 2, 4), plan_batches(7, 8, 4)
        ([4, 3, 3], [5, 5], [5], [7])
        >>> plan_batches(100, 48, 4)
        [34, 33, 33]
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if min_batch_size < 1:
        raise ValueError(f"min_batch_size must be >= 1, got {min_batch_size}")
    if num_samples < min_batch_size:
        warnings.warn(
            f"{num_samples} samples are fewer than min_batch_size {min_batch_size}: they are inverted "
            "as one batch whose batch variance cannot match the statistics well; ask for at least "
            f"{min_batch_size} samples",
            UserWarning,
            stacklevel=3,
        )
        return [num_samples]
    b = max(batch_size, min_batch_size)
    k = math.ceil(num_samples / b)
    if num_samples // k < min_batch_size:
        k = num_samples // min_batch_size
    q, r = divmod(num_samples, k)
    return [q + 1] * r + [q] * (k - r)
