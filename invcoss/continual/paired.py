"""Statistics over seeds: mean and sample sd, the paired t statistic and a bootstrap interval.

The multi-seed report (:mod:`invcoss.continual.seeds`) compares methods run on the same seeds, so
the natural unit is the per-seed difference ``a - b`` of one number (for example invcoss's CT
forgetting minus seq's): :func:`paired_difference` summarises those differences by their mean,
sample sd (``n - 1`` in the denominator), the paired t statistic ``mean / (sd / sqrt(n))`` and a
percentile bootstrap interval of the mean (resampling seeds with replacement, from a seeded
generator, so the report is a function of its inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "bootstrap_interval", "mean_sd", "paired_difference", "paired_t"]


def _values(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} expects a non-empty sequence of numbers, got shape {x.shape}")
    return x


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; NaN for a single value).

    Example:
        >>> mean_sd([1.0, 2.0, 3.0, 4.0])
        (2.5, 1.2909944487358056)
        >>> mean_sd([0.5])
        (0.5, nan)
    """
    x = _values(values, "mean_sd")
    sd = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return float(x.mean()), sd


def paired_t(differences: Sequence[float]) -> float:
    """The paired t statistic ``mean / (sd / sqrt(n))`` of per-seed differences.

    NaN for fewer than two differences or when all are zero; +-inf when they are equal and non-zero.

    Example:
        >>> round(paired_t([1.0, 2.0, 3.0]), 6)
        3.464102
    """
    x = _values(differences, "paired_t")
    if x.size < 2:
        return math.nan
    mean, sd = mean_sd(x)
    if sd == 0:
        return math.nan if mean == 0 else math.copysign(math.inf, mean)
    return mean / (sd / math.sqrt(x.size))


def bootstrap_interval(
    values: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample ``values`` with replacement.

    Args:
        values: one number per seed.
        resamples: bootstrap samples (>= 1).
        level: coverage in (0, 1); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
            quantiles of the resampled means.
        seed: seeds the resampling (the same inputs give the same interval).

    Raises:
        ValueError: empty ``values``, ``resamples < 1`` or ``level`` outside (0, 1).

    Example:
        >>> bootstrap_interval([0.2, 0.2, 0.2])
        (0.2, 0.2)
        >>> lo, hi = bootstrap_interval([0.1, 0.3, 0.2, 0.4])
        >>> 0.1 <= lo < 0.25 < hi <= 0.4
        True
    """
    x = _values(values, "bootstrap_interval")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    # A constant input resamples to that constant; round-off in the mean must not widen it.
    lo_x, hi_x = float(x.min()), float(x.max())
    return min(max(float(lo), lo_x), hi_x), max(min(float(hi), hi_x), lo_x)


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``a - b`` of one number (``column``) on one ``modality``, summarised.

    ``modality`` is ``"mean"`` for the mean over the modalities before the last stage.
    ``low``/``high`` is the bootstrap interval of the mean at ``level``.
    """

    a: str
    b: str
    modality: str
    column: str
    n: int
    mean: float
    sd: float
    t: float
    low: float
    high: float
    level: float
    differences: tuple[float, ...]


def paired_difference(
    a: str,
    b: str,
    modality: str,
    column: str,
    values_a: Sequence[float],
    values_b: Sequence[float],
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Summarise ``values_a[k] - values_b[k]`` over seeds ``k`` (module docstring).

    Raises:
        ValueError: the two sequences differ in length or are empty.

    Example:
        >>> d = paired_difference("invcoss", "seq", "ct", "forgetting", [0.1, 0.2, 0.3], [0.2, 0.2, 0.5])
        >>> [round(v, 4) for v in (d.mean, d.sd, d.t)], d.n
        ([-0.1, 0.1, -1.7321], 3)
    """
    if len(values_a) != len(values_b):
        raise ValueError(
            f"paired_difference needs one value of {a} and of {b} per seed, got {len(values_a)} and {len(values_b)}"
        )
    d = _values(values_a, "paired_difference") - _values(values_b, "paired_difference")
    mean, sd = mean_sd(d)
    low, high = bootstrap_interval(d, resamples, level, seed)
    return PairedDifference(
        a,
        b,
        modality,
        column,
        int(d.size),
        mean,
        sd,
        paired_t(d),
        low,
        high,
        level,
        tuple(float(v) for v in d),
    )
