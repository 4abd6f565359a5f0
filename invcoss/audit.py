"""A privacy audit of synthetic data: do synthetic samples copy training scans, and how close do the
stored statistics come to one scan.

**Memorisation** (:func:`memorisation_audit`). For every synthetic sample, the distance to its nearest
real training sample, in two spaces:

* pixels: the root-mean-square voxel difference of the model inputs (after the model's
  preprocessing, so in the units of :data:`invcoss.modality.INPUT_SPACES`: CT HU/1024, MRI z-scores,
  2D grey in [0, 1]);
* features: the root-mean-square difference of the frozen model's ``embed`` features.

The same distances are measured for real samples that are *not* in the training set (``heldout``),
or, without held-out data, for every training sample to the training samples of *other* source files
(leave-one-source-out: the windows of one scan overlap and would otherwise be each other's copies).
A synthetic sample is flagged in a space when it is closer to a training sample than the
``percentile``-th percentile (default 5) of those reference distances: closer than 95 % of unseen
real data come. The memorisation score is the flagged fraction. A generator that draws new samples
from the data distribution scores about ``percentile / 100`` (0.05) by construction; a score well
above it, or any sample flagged in both spaces, means samples copy training scans, and the closest
pairs (saved side by side, :func:`save_closest_pairs`) show which.

**Statistics** (:func:`stats_audit`). The stored per-token mean of the first encoder block against the
same block's features of every training sample, in units of the spread the statistics store
(``|f_i - mean| / sqrt(sum var)``): independent members of a cohort of N lie at about
``sqrt((N - 1) / N)`` of it, non-members at ``sqrt((N + 1) / N)``; a single scan's statistics put it at
0. With held-out data the same is measured for them and the fraction of training samples closer than
the held-out ``percentile`` is reported (a distance-to-mean membership test).

Neither test proves privacy: see ``docs/audit.md`` for what they do not cover.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from invcoss.data.writers import write_png

__all__ = [
    "DEFAULT_PERCENTILE",
    "SpaceAudit",
    "audit_summary",
    "format_audit",
    "memorisation_audit",
    "nearest_distances",
    "save_closest_pairs",
    "stats_audit",
]

DEFAULT_PERCENTILE = 5.0
"""Reference percentile of the memorisation threshold: a flagged synthetic sample is closer to a
training sample than 95 % of held-out real samples are."""
_CHUNK = 256


def nearest_distances(
    queries: Tensor, train: Tensor, query_groups: Tensor | None = None, train_groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RMS distance of every query row to its nearest training row, and that row's index.

    Args:
        queries: ``(N, F)``; train: ``(M, F)``.
        query_groups, train_groups: optional ``(N,)`` / ``(M,)`` integer group ids (source files);
            a training row of the query's own group is never its nearest (leave-one-source-out).

    Returns:
        ``(distances (N,) float64, index (N,) int64)``; ``inf`` / -1 where no row is eligible.

    Example:
        >>> d, i = nearest_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [3.0, 3.0]]))
        >>> [round(v, 4) for v in d.tolist()], i.tolist()
        ([0.7071, 0.7071], [0, 1])
    """
    if queries.ndim != 2 or train.ndim != 2 or queries.shape[1] != train.shape[1]:
        raise ValueError(
            f"nearest_distances expects queries (N, F) and train (M, F), got {tuple(queries.shape)} "
            f"and {tuple(train.shape)}"
        )
    width = queries.shape[1]
    train64 = train.double()
    dist = torch.full((queries.shape[0],), math.inf, dtype=torch.float64)
    index = torch.full((queries.shape[0],), -1, dtype=torch.int64)
    for a in range(0, queries.shape[0], _CHUNK):
        d = torch.cdist(queries[a : a + _CHUNK].double(), train64)  # (n, M)
        if query_groups is not None and train_groups is not None:
            same = query_groups[a : a + _CHUNK, None] == train_groups[None, :]
            d = d.masked_fill(same, math.inf)
        if d.shape[1]:
            best, arg = d.min(1)
            dist[a : a + _CHUNK] = best / math.sqrt(width)
            index[a : a + _CHUNK] = torch.where(torch.isfinite(best), arg, -1)
    return dist, index


@dataclass
class SpaceAudit:
    """The memorisation audit in one space (pixels or features).

    Attributes:
        synthetic: ``(N,)`` nearest-training distance of every synthetic sample.
        nearest: ``(N,)`` the index of that training sample.
        reference: ``(R,)`` nearest-training distances of the reference (held-out) samples.
        threshold: the ``percentile``-th percentile of ``reference``.
        flagged: ``(N,)`` bool, ``synthetic < threshold``.
    """

    synthetic: Tensor
    nearest: Tensor
    reference: Tensor
    threshold: float
    flagged: Tensor

    @property
    def score(self) -> float:
        """The memorisation score: the fraction of synthetic samples flagged."""
        return float(self.flagged.double().mean()) if self.flagged.numel() else 0.0

    def summary(self) -> dict:
        finite = self.reference[torch.isfinite(self.reference)]
        return {
            "score": self.score,
            "threshold": self.threshold,
            "flagged": int(self.flagged.sum()),
            "synthetic_nearest": {
                "min": float(self.synthetic.min()),
                "median": float(self.synthetic.median()),
            },
            "reference_nearest": {
                "min": float(finite.min()) if finite.numel() else None,
                "median": float(finite.median()) if finite.numel() else None,
            },
        }


def _space(syn: Tensor, ref: Tensor, train: Tensor, groups: Tensor | None, percentile: float) -> SpaceAudit:
    d_syn, i_syn = nearest_distances(syn, train)
    if groups is None:
        d_ref, _ = nearest_distances(ref, train)
    else:
        d_ref, _ = nearest_distances(ref, train, groups, groups)
    finite = d_ref[torch.isfinite(d_ref)]
    if finite.numel() == 0:
        raise ValueError(
            "the audit needs reference distances: give held-out real samples, or training samples of at "
            "least two source files"
        )
    threshold = float(np.percentile(finite.numpy(), percentile))
    return SpaceAudit(d_syn, i_syn, d_ref, threshold, d_syn < threshold)


@torch.no_grad()
def _embed(model: nn.Module, x: Tensor, device, batch_size: int) -> Tensor:
    param = next(model.parameters())
    out = [model.embed(b.to(device=device, dtype=param.dtype)).double().cpu() for b in x.split(batch_size)]
    return torch.cat(out)


def memorisation_audit(
    model: nn.Module,
    synthetic: Tensor,
    train: Tensor,
    heldout: Tensor | None = None,
    train_groups: Iterable[int] | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    device: torch.device | str | None = None,
    batch_size: int = 16,
) -> dict[str, SpaceAudit]:
    """Nearest-training-sample distances of synthetic and reference samples, in pixels and features.

    Args:
        model: the frozen model (its ``embed`` gives the features; set to eval mode here).
        synthetic, train, heldout: model inputs ``(N, C, *S)`` of one shape.
        train_groups: the source file of every training sample (ids), used without ``heldout`` to
            measure the reference as leave-one-source-out distances; default: each sample its own.
        percentile: the reference percentile of the threshold (0 < p < 100).

    Returns:
        ``{"pixels": SpaceAudit, "features": SpaceAudit}`` (see the module docstring).

    Raises:
        ValueError: shapes differ, an empty set, a bad percentile, or no reference distance.
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    shapes = {name: tuple(t.shape[1:]) for name, t in (("synthetic", synthetic), ("train", train))}
    if heldout is not None:
        shapes["heldout"] = tuple(heldout.shape[1:])
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the audit expects samples of one shape, got {shapes}")
    for name, t in (("synthetic", synthetic), ("train", train), ("heldout", heldout)):
        if t is not None and t.shape[0] == 0:
            raise ValueError(f"the audit got no {name} sample")
    groups = None
    if heldout is None:
        ids = list(train_groups) if train_groups is not None else list(range(train.shape[0]))
        if len(ids) != train.shape[0]:
            raise ValueError(f"train_groups has {len(ids)} ids for {train.shape[0]} training samples")
        groups = torch.as_tensor(ids, dtype=torch.int64)
    ref = heldout if heldout is not None else train
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        feats = {name: _embed(model, t, device, batch_size) for name, t in (("s", synthetic), ("t", train))}
        feats["r"] = _embed(model, ref, device, batch_size) if heldout is not None else feats["t"]
    finally:
        model.train(was_training)
    flat = {k: t.reshape(t.shape[0], -1) for k, t in (("s", synthetic), ("t", train), ("r", ref))}
    return {
        "pixels": _space(flat["s"], flat["r"], flat["t"], groups, percentile),
        "features": _space(feats["s"], feats["r"], feats["t"], groups, percentile),
    }


@torch.no_grad()
def _block_distance(model: nn.Module, x: Tensor, mean: Tensor, spread: float, block: int, device, bs: int):
    param = next(model.parameters())
    out = []
    for b in x.split(bs):
        f = model.block_features(b.to(device=device, dtype=param.dtype))[block].double().cpu()  # (B, L, D)
        out.append((f - mean).flatten(1).norm(dim=1) / spread)
    return torch.cat(out)


def stats_audit(
    model: nn.Module,
    stats,
    train: Tensor,
    heldout: Tensor | None = None,
    block: int = 0,
    percentile: float = DEFAULT_PERCENTILE,
    device: torch.device | str | None = None,
    batch_size: int = 16,
) -> dict:
    """How close the stored per-token mean of block ``block`` comes to any single training sample.

    Distances are ``|f_i - mean|_F / sqrt(sum var)`` (the spread the statistics store, floored at
    1e-12): about ``sqrt((N-1)/N)`` for a member of a cohort of N, ``sqrt((N+1)/N)`` for a non-member,
    0 for the only member.

    Args:
        stats: a :class:`~invcoss.feature_stats.FeatureStats` of ``model``.
        train, heldout: model inputs ``(N, C, *S)``.

    Returns:
        a dict: the cohort (``count``, ``sources``, ``min_cohort``, ``below_minimum``), ``block``,
        ``train`` (min, median and the index of the closest sample), ``heldout`` (min, median, the
        threshold) and ``train_closer`` (the fraction of training samples below the held-out threshold)
        when held-out data are given.
    """
    from invcoss.feature_stats import MIN_COHORT_SOURCES

    if not 0 <= block < stats.num_layers:
        raise ValueError(f"block must be in [0, {stats.num_layers}), got {block}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    mean = stats.mean[block].double().cpu()
    spread = math.sqrt(max(float(stats.var[block].double().sum()), 1e-12))
    was_training = model.training
    model.eval()
    try:
        d_train = _block_distance(model, train, mean, spread, block, device, batch_size)
        d_held = None
        if heldout is not None:
            d_held = _block_distance(model, heldout, mean, spread, block, device, batch_size)
    finally:
        model.train(was_training)
    cohort = stats.sources if stats.sources is not None else stats.count
    out = {
        "count": stats.count,
        "sources": stats.sources,
        "min_cohort": MIN_COHORT_SOURCES,
        "below_minimum": cohort < MIN_COHORT_SOURCES,
        "block": block,
        "train": {
            "min": float(d_train.min()),
            "median": float(d_train.median()),
            "closest": int(d_train.argmin()),
        },
        "heldout": None,
        "train_closer": None,
    }
    if d_held is not None:
        threshold = float(np.percentile(d_held.numpy(), percentile))
        out["heldout"] = {
            "min": float(d_held.min()),
            "median": float(d_held.median()),
            "threshold": threshold,
        }
        out["train_closer"] = float((d_train < threshold).double().mean())
    return out


def _view(x: Tensor, space) -> np.ndarray:
    """One sample ``(C, *S)`` as a display image ``(C', H, W)`` in [0, 1] (central slice of a volume)."""
    a = x.float().numpy()
    if a.ndim == 4:
        a = a[:, a.shape[1] // 2]
    lo, hi = space.display_range if space is not None else (float(a.min()), float(a.max()) or 1.0)
    a = np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return a[:1] if a.shape[0] != 3 else a


def save_closest_pairs(
    path: str | os.PathLike, audit: SpaceAudit, synthetic: Tensor, train: Tensor, space=None, pairs: int = 8
) -> Path:
    """The ``pairs`` synthetic samples nearest to a training sample, each beside it, as one PNG.

    Row k: synthetic | nearest training sample, closest pair first; volumes show their central
    slice, in the modality's display range (``space``, an :class:`~invcoss.modality.InputSpace`).
    """
    order = torch.argsort(audit.synthetic)[:pairs].tolist()
    views = [(_view(synthetic[i], space), _view(train[int(audit.nearest[i])], space)) for i in order]
    c = max(v.shape[0] for pair in views for v in pair)
    h, w = views[0][0].shape[1:]
    gap = 2
    canvas = np.ones((c, len(views) * (h + gap) - gap, 2 * w + gap), dtype=np.float32)
    for k, (s, t) in enumerate(views):
        top = k * (h + gap)
        canvas[:, top : top + h, :w] = s
        canvas[:, top : top + h, w + gap :] = t
    return write_png(path, canvas)


def audit_summary(spaces: dict[str, SpaceAudit], percentile: float, reference: str) -> dict:
    """The JSON-able summary of :func:`memorisation_audit`: per space, plus the samples flagged in both."""
    both = spaces["pixels"].flagged & spaces["features"].flagged
    return {
        "percentile": percentile,
        "reference": reference,
        "synthetic": int(spaces["pixels"].synthetic.numel()),
        "reference_samples": int(spaces["pixels"].reference.numel()),
        "pixels": spaces["pixels"].summary(),
        "features": spaces["features"].summary(),
        "flagged_both": [int(i) for i in torch.nonzero(both).flatten()],
    }


def format_audit(summary: dict, stats: dict | None = None) -> list[str]:
    """The audit as short lines for a terminal."""
    p = summary["percentile"]
    lines = []
    for space in ("pixels", "features"):
        s = summary[space]
        lines.append(
            f"memorisation ({space}): {100 * s['score']:.1f}% of {summary['synthetic']} synthetic samples "
            f"closer to a training sample than {100 - p:g}% of {summary['reference']} samples "
            f"(threshold {s['threshold']:.4g}; nearest synthetic {s['synthetic_nearest']['min']:.4g}, "
            f"median {s['synthetic_nearest']['median']:.4g}; {summary['reference']} median "
            f"{s['reference_nearest']['median']:.4g})"
        )
    lines.append(f"flagged in both spaces: {len(summary['flagged_both'])} synthetic samples")
    if stats is not None:
        cohort = f"{stats['count']} samples, {stats['sources'] if stats['sources'] is not None else 'unknown'} sources"
        lines.append(
            f"statistics ({cohort}{', BELOW the minimum of ' + str(stats['min_cohort']) if stats['below_minimum'] else ''}): "
            f"block {stats['block']} mean at {stats['train']['min']:.3g} spreads from the closest training "
            f"sample (median {stats['train']['median']:.3g})"
            + (
                f", held-out median {stats['heldout']['median']:.3g}, {100 * stats['train_closer']:.0f}% of "
                "training samples closer than the held-out threshold"
                if stats["heldout"]
                else ""
            )
        )
    return lines
