"""What a dataset's written outputs must agree with: its voxel spacing and its intensity range.

A :class:`DataSummary` is recorded in a feature statistics file when the statistics are collected
(:func:`invcoss.feature_stats.collect_feature_stats`, metadata field ``data``) and read back when
the model is inverted, so synthetic volumes carry the spacing of the data the model saw and MRI
samples span the intensities it saw:

- :class:`SpacingSummary`: the voxel spacing ``(D, H, W)`` in mm of the preprocessed samples (their
  cache manifest, or the headers of a folder of scans): the per-axis median, which volumes are
  written with, and the per-axis minimum and maximum (the spread of a cohort of mixed spacings).
- :class:`IntensitySummary`: the exact minimum and maximum of the model-input values and their
  0.1, 1, 50, 99 and 99.9th percentiles, from an :class:`IntensityHistogram` (bins of 1/256 over
  [-64, 64]; percentiles are bin centres, exact to 1/512, clipped to the exact range; non-finite
  values are left out and counted).

Example:
    >>> h = IntensityHistogram()
    >>> h.update(torch.tensor([-1.0, 0.0, 0.5, 7.5]))
    >>> s = DataSummary(spacing_summary([(1.0, 2.0, 2.0), (1.0, 2.0, 2.0), (3.0, 2.0, 2.0)]), h.summary())
    >>> s.spacing.median, s.spacing.high, s.intensity.max
    ((1.0, 2.0, 2.0), (3.0, 2.0, 2.0), 7.5)
    >>> DataSummary.from_json(s.to_json()) == s
    True
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PERCENTILES",
    "DataSummary",
    "IntensityHistogram",
    "IntensitySummary",
    "SpacingSummary",
    "data_spacings",
    "spacing_summary",
]

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
_ROUND = 4  # decimals kept of spacings (mm) and intensities


@dataclass(frozen=True)
class SpacingSummary:
    """Voxel spacing ``(D, H, W)`` in mm of a dataset's samples.

    Attributes:
        median: per-axis median over the samples (what synthetic volumes are written with).
        low, high: per-axis minimum and maximum (equal to ``median`` when every sample agrees).
        samples: the number of samples they summarise.
    """

    median: tuple[float, float, float]
    low: tuple[float, float, float]
    high: tuple[float, float, float]
    samples: int

    @property
    def mixed(self) -> bool:
        """The samples do not all share one spacing."""
        return self.low != self.high

    def to_dict(self) -> dict:
        return {
            "median": list(self.median),
            "low": list(self.low),
            "high": list(self.high),
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpacingSummary:
        return cls(tuple(d["median"]), tuple(d["low"]), tuple(d["high"]), int(d["samples"]))


@dataclass(frozen=True)
class IntensitySummary:
    """The model-input values of a dataset.

    Attributes:
        min, max: exact extremes of the finite values.
        percentiles: ``{"0.1": v, "1": v, "50": v, "99": v, "99.9": v}`` (to 1/512).
        count: finite values summarised.
        nonfinite: NaN or infinite values seen and left out.
    """

    min: float
    max: float
    percentiles: dict[str, float]
    count: int
    nonfinite: int = 0

    def to_dict(self) -> dict:
        return {
            "min": self.min,
            "max": self.max,
            "percentiles": dict(self.percentiles),
            "count": self.count,
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def from_dict(cls, d: dict) -> IntensitySummary:
        pct = {str(k): float(v) for k, v in d["percentiles"].items()}
        return cls(float(d["min"]), float(d["max"]), pct, int(d["count"]), int(d.get("nonfinite", 0)))


class IntensityHistogram:
    """Streaming minimum, maximum and histogram of values, for :class:`IntensitySummary`.

    Fixed bins (``BINS_PER_UNIT`` per unit over ``[-LIMIT, LIMIT]``; values beyond fall in the end
    bins, the exact extremes are kept apart) make the state a sum: merging two histograms, or the
    histograms of every rank, gives the histogram of all the values, whatever the order.
    """

    LIMIT = 64.0
    BINS_PER_UNIT = 256

    def __init__(self) -> None:
        self.counts = torch.zeros(int(2 * self.LIMIT * self.BINS_PER_UNIT), dtype=torch.int64)
        self.min = float("inf")
        self.max = float("-inf")
        self.nonfinite = 0

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def update(self, x: Tensor) -> None:
        """Fold the values of ``x`` (any shape; moved to the CPU, where the counts are exact and
        deterministic) into the histogram."""
        v = x.detach().reshape(-1).to("cpu", torch.float64)
        finite = torch.isfinite(v)
        kept = v[finite]
        self.nonfinite += int(v.numel() - kept.numel())
        if kept.numel() == 0:
            return
        self.min = min(self.min, float(kept.min()))
        self.max = max(self.max, float(kept.max()))
        n = self.counts.numel()
        idx = ((kept + self.LIMIT) * self.BINS_PER_UNIT).floor().clamp_(0, n - 1).long()
        self.counts += torch.bincount(idx, minlength=n)

    def merge(self, other: IntensityHistogram) -> IntensityHistogram:
        """Fold another histogram into this one; returns self."""
        self.counts += other.counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.nonfinite += other.nonfinite
        return self

    def all_reduce(self, group: object = None) -> IntensityHistogram:
        """Sum the histograms of every ``torch.distributed`` rank into each rank; returns self.

        Without an initialised process group it does nothing.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        extremes = torch.tensor([-self.min, self.max], dtype=torch.float64)
        nonfinite = torch.tensor([self.nonfinite], dtype=torch.int64)
        dist.all_reduce(self.counts, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(nonfinite, group=group)
        self.min, self.max, self.nonfinite = -float(extremes[0]), float(extremes[1]), int(nonfinite)
        return self

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100): the centre of the bin the cumulative count reaches,
        clipped to the exact extremes."""
        cum = torch.cumsum(self.counts, 0)
        target = q / 100.0 * float(cum[-1])
        k = int(torch.searchsorted(cum.double(), torch.tensor([max(target, 1.0)], dtype=torch.float64)))
        centre = (k + 0.5) / self.BINS_PER_UNIT - self.LIMIT
        return min(max(centre, self.min), self.max)

    def summary(self) -> IntensitySummary | None:
        """The :class:`IntensitySummary` of everything folded in; None before any finite value."""
        if self.count == 0:
            return None
        pct = {f"{q:g}": round(self.percentile(q), _ROUND) for q in PERCENTILES}
        return IntensitySummary(
            round(self.min, _ROUND), round(self.max, _ROUND), pct, self.count, self.nonfinite
        )


def spacing_summary(spacings: Sequence[Sequence[float]]) -> SpacingSummary | None:
    """The :class:`SpacingSummary` of per-sample spacings ``(D, H, W)``; None for none.

    Raises:
        ValueError: a spacing that is not 3 positive finite numbers.
    """
    if not spacings:
        return None
    a = np.asarray(spacings, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or not (np.isfinite(a).all() and (a > 0).all()):
        raise ValueError(
            f"spacing_summary expects spacings of 3 positive values (D, H, W) in mm, got {a.tolist()[:3]}"
        )

    def row(v: np.ndarray) -> tuple[float, float, float]:
        return tuple(round(float(s), _ROUND) for s in v)  # type: ignore[return-value]

    return SpacingSummary(row(np.median(a, axis=0)), row(a.min(axis=0)), row(a.max(axis=0)), len(a))


def data_spacings(data) -> list[tuple[float, ...]] | None:
    """Per-sample voxel spacings of ``data``: a preprocessed cache's (its manifest), a folder
    dataset's (from the scans' headers and its preprocessing), or those of the dataset a
    DataLoader wraps; None when the data do not say (tensors, 2D data)."""
    samples = getattr(data, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], dict):
        spacings = [s.get("spacing") for s in samples]
        return [tuple(s) for s in spacings] if all(s for s in spacings) else None
    pre, files, index = (getattr(data, k, None) for k in ("pre", "files", "index"))
    if pre is not None and isinstance(files, list) and isinstance(index, list):
        per_file = [pre.sample_spacing(f) for f in files]
        if all(s is not None for s in per_file):
            return [per_file[f] for f, _ in index]
        return None
    inner = getattr(data, "dataset", None)
    return data_spacings(inner) if inner is not None and inner is not data else None


@dataclass(frozen=True)
class DataSummary:
    """What the data behind a statistics file were: :class:`SpacingSummary` (3D) and
    :class:`IntensitySummary`; either may be None (unknown)."""

    spacing: SpacingSummary | None = None
    intensity: IntensitySummary | None = None

    @property
    def value_range(self) -> tuple[float | None, float | None]:
        """``(min, max)`` of the values; ``(None, None)`` when unknown."""
        return (self.intensity.min, self.intensity.max) if self.intensity else (None, None)

    def to_json(self) -> str:
        """The metadata string of a statistics file (sorted keys: the same summary, the same bytes)."""
        d = {
            "spacing_mm": self.spacing.to_dict() if self.spacing else None,
            "intensity": self.intensity.to_dict() if self.intensity else None,
        }
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DataSummary:
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: not such a JSON object.
        """
        try:
            d = json.loads(text)
            spacing = SpacingSummary.from_dict(d["spacing_mm"]) if d.get("spacing_mm") else None
            intensity = IntensitySummary.from_dict(d["intensity"]) if d.get("intensity") else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot read the data summary {text[:80]!r}: {type(e).__name__}: {e}") from None
        return cls(spacing, intensity)
