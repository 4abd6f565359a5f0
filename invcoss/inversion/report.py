"""How good an inversion is, in numbers: the quality report of every run.

- **Statistics**: the final L_norm (sum over blocks of the stat-matching loss, Eq. 3) of each
  synthetic batch, next to its value for random noise of the same batch size in the same input
  space (and for real batches of the same size with a reference). Lower is closer to the data the
  statistics summarise.
- **Diversity**: the mean pairwise cosine similarity of the synthetic samples' ``model.embed``
  features (mode collapse pushes it towards 1), optionally with L_rep toggled (same seed and
  steps), and of real samples with a reference.
- **Distance from the target mean**, per batch: how far the batch mean of every feature (every
  block, token and channel the statistics hold) lies from the target mean, in units of the target
  standard deviation, as the median over all of them (:func:`mean_distance`). Real batches of the
  same sizes sit near ``1 / sqrt(B)`` (about 0.5 at B = 5); a batch that has not reached the
  statistics sits several std away.
- **Intensity histogram** of the synthetic voxels/pixels over the modality's value range (the
  range the statistics' training data were mapped into, :data:`invcoss.modality.INPUT_SPACES`),
  in named bands for CT (air below -900 HU, lung -900..-700, mixed -700..-150, soft tissue
  -150..150, dense above 150 HU) and in equal bins otherwise, next to the reference's
  (:func:`intensity_histogram`). The feature statistics do not store an intensity range of their
  own, so the real data, when given, are what the synthetic histogram is read against.
- **Fréchet distance** between Gaussians fitted to the synthetic and the reference features in the
  model's embedding space (as FID, with the inverted model as the feature extractor), next to the
  same for random noise.
- **Memorisation** (with a reference): the privacy audit of :mod:`invcoss.audit` with the reference
  as the training set: every synthetic sample's nearest-reference distance in pixels and features
  against the reference samples' leave-one-out nearest distances; the score is the fraction of
  synthetic samples closer than the 5th percentile (``invcoss-cli audit`` adds held-out data).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from invcoss.audit import DEFAULT_PERCENTILE, audit_summary, memorisation_audit
from invcoss.data import config_for_input, open_dataset
from invcoss.inversion.engine import InversionEngine, derive_seed, plan_batches
from invcoss.inversion.files import read_samples

__all__ = [
    "CT_BANDS_HU",
    "embed_batches",
    "format_report",
    "frechet_distance",
    "intensity_histogram",
    "mean_distance",
    "mean_pairwise_cosine",
    "quality_report",
    "reference_batches",
]


CT_BANDS_HU = (
    ("air", -1024.0, -900.0),
    ("lung", -900.0, -700.0),
    ("mixed", -700.0, -150.0),
    ("soft tissue", -150.0, 150.0),
    ("dense", 150.0, 1024.0),
)
"""The named CT intensity bands of the quality report, in Hounsfield units (model input x 1024)."""

HISTOGRAM_BINS = 8  # equal bins over the value range for modalities without named bands


def intensity_histogram(space, batches) -> dict[str, float]:
    """Fraction of the values of ``batches`` (model inputs ``(B, C, *S)``) in each intensity band.

    CT: the bands of :data:`CT_BANDS_HU` (the first band includes its lower edge and every band
    its upper one's complement, so the fractions sum to 1; values outside [-1024, 1024] HU fall
    in the end bands). Other modalities: :data:`HISTOGRAM_BINS` equal bins over
    ``space.value_range``, named by their lower edge. Only the first channel counts (X-ray's grey
    is replicated).

    Example:
        >>> from invcoss.modality import INPUT_SPACES
        >>> x = torch.tensor([-1.0, -0.95, 0.0, 0.5]).reshape(1, 1, 1, 2, 2)
        >>> intensity_histogram(INPUT_SPACES["ct"], [x])
        {'air': 0.5, 'lung': 0.0, 'mixed': 0.0, 'soft tissue': 0.25, 'dense': 0.25}
    """
    if space.modality == "ct":
        names = [n for n, _, _ in CT_BANDS_HU]
        inner = torch.tensor([hi / 1024.0 for _, _, hi in CT_BANDS_HU[:-1]], dtype=torch.float64)
    else:
        lo, hi = space.value_range
        edges = torch.linspace(lo, hi, HISTOGRAM_BINS + 1, dtype=torch.float64)
        names = [f"{float(e):.3g}" for e in edges[:-1]]
        inner = edges[1:-1]
    counts = torch.zeros(len(names), dtype=torch.float64)
    for x in batches:
        values = x[:, :1].reshape(-1).double()
        counts += torch.bincount(torch.bucketize(values, inner, right=True), minlength=len(names)).double()
    total = float(counts.sum())
    return {n: (float(c) / total if total else 0.0) for n, c in zip(names, counts)}


@torch.no_grad()
def mean_distance(inv: InversionEngine, x: Tensor) -> float:
    """Median over every block, token and channel of ``|batch mean - target mean| / target std``.

    ``x`` is one batch of model inputs ``(B, C, *S)``; the batch mean is over its B samples, as
    the stat-matching loss takes it. Target variances are floored at 1e-12.
    """
    gaps = []
    for f, (mean, var) in zip(inv.model.block_features(x.to(inv.device)), inv.targets, strict=True):
        gaps.append(((f.float().mean(0) - mean).abs() / var.clamp_min(1e-12).sqrt()).reshape(-1))
    return float(torch.cat(gaps).median())


def mean_pairwise_cosine(features: Tensor) -> float:
    """Mean cosine similarity over all pairs ``i != j`` of ``features: (N, D)`` (N >= 2).

    Example:
        >>> mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # 0, .707, .707
        0.4714...
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"mean_pairwise_cosine expects features of shape (N >= 2, D), got {tuple(features.shape)}"
        )
    f = features.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = f.shape[0]
    gram = f @ f.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``a: (N, D)`` and ``b: (M, D)`` (N, M >= 2).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, in float64. ``Tr (S_a S_b)^(1/2)`` is
    the sum of the square roots of the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)``,
    which stays defined for the singular covariances of fewer samples than dimensions.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 4, generator=g)
        >>> round(frechet_distance(x, x), 6), frechet_distance(x, x + 3.0) > 35.9
        (0.0, True)
    """
    for name, t in (("a", a), ("b", b)):
        if t.ndim != 2 or t.shape[0] < 2:
            raise ValueError(f"frechet_distance expects {name} of shape (N >= 2, D), got {tuple(t.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"frechet_distance expects a and b of the same width, got {a.shape[1]} and {b.shape[1]}"
        )
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return max(float(value), 0.0)


@torch.no_grad()
def embed_batches(inv: InversionEngine, batches) -> Tensor:
    """``model.embed`` of every batch ``(B, C, *S)``, concatenated: ``(N, D)`` float32 CPU."""
    out = [inv.model.embed(x.to(inv.device)).float().cpu() for x in batches]
    return torch.cat(out) if out else torch.zeros(0, inv.model.config.embed_dim)


@torch.no_grad()
def _stat_losses(inv: InversionEngine, batches) -> list[float]:
    return [float(inv.stat_loss(inv.model.block_features(x.to(inv.device)))) for x in batches]


def reference_batches(inv: InversionEngine, path: str | os.PathLike, limit: int) -> list[Tensor]:
    """Up to ``limit`` real samples of a folder of scans or a cache, in the inversion's batch plan.

    The samples are preprocessed with the paper's processing of the modality at the model's input
    size; with more than ``limit`` available an evenly spaced subset is taken.

    Raises:
        ValueError: the folder is missing, of another modality, or gives no sample.
    """

    path = Path(path)
    if not path.exists():
        raise ValueError(f"reference {path} does not exist")
    config = config_for_input(inv.space.modality, inv.input_shape[1:], channels=inv.input_shape[0])
    ds = open_dataset(path, inv.space.modality, config=config)
    if len(ds) == 0:
        raise ValueError(f"reference {path} holds no readable {inv.space.modality} sample")
    first = ds[0]
    if tuple(first.shape) != tuple(inv.input_shape):
        raise ValueError(
            f"reference {path} gives samples of shape {tuple(first.shape)}, but the model takes "
            f"{tuple(inv.input_shape)}"
        )
    index = np.unique(np.linspace(0, len(ds) - 1, min(limit, len(ds))).round().astype(int))
    samples = torch.stack([ds[int(i)].float() for i in index])
    return list(samples.split(plan_batches(len(samples), inv.config.batch_size, inv.config.min_batch_size)))


def quality_report(
    inv: InversionEngine,
    manifest: dict,
    paths: list[Path],
    reference: str | os.PathLike | None = None,
    compare_rep: bool = False,
    max_reference: int = 256,
) -> dict:
    """The quality section of a run's manifest (see the module docstring).

    Args:
        inv: the inverter of the run (model, statistics, config).
        manifest: the run's manifest, with the per-batch ``stat_loss`` and ``noise_stat_loss``.
        paths: the sample files.
        reference: real scans or a cache of the modality, or their batches as
            :func:`reference_batches` returns them (optional).
        compare_rep: invert again in memory with L_rep toggled, same seed and steps.
        max_reference: at most this many reference samples.
    """
    batches = manifest["batches"]
    # The run's own batches, so the per-batch distances are those of the batches that were optimised.
    starts = np.cumsum([0] + [len(b["samples"]) for b in batches])
    samples = [
        next(read_samples(paths[a:z], z - a, manifest)) for a, z in zip(starts[:-1], starts[1:]) if z > a
    ]
    synthetic = embed_batches(inv, samples)
    noise_gen = torch.Generator().manual_seed(derive_seed(inv.config.seed, "report-noise", 0))
    noise = [inv.space.noise((len(b["samples"]), *inv.input_shape), noise_gen) for b in batches]
    noise_features = embed_batches(inv, noise)
    report: dict = {
        "num_samples": len(paths),
        "stat_loss": {
            "synthetic": float(np.mean([b["stat_loss"] for b in batches])),
            "noise": float(np.mean([b["noise_stat_loss"] for b in batches])),
            "reference": None,
        },
        "mean_pairwise_cosine": {
            "synthetic": mean_pairwise_cosine(synthetic) if len(paths) > 1 else None,
            "noise": mean_pairwise_cosine(noise_features) if len(paths) > 1 else None,
            "reference": None,
        },
        "mean_distance_std": {
            "synthetic": [mean_distance(inv, x) for x in samples],
            "noise": [mean_distance(inv, x) for x in noise],
            "reference": None,
        },
        "intensity": {"synthetic": intensity_histogram(inv.space, samples), "reference": None},
        "rep_comparison": None,
        "frechet_distance": None,
        "reference": None,
        "memorisation": None,
    }
    if compare_rep:
        report["rep_comparison"] = rep_comparison(inv, len(paths), synthetic)
    if reference is not None:
        if isinstance(reference, list):
            real, label = reference, manifest.get("sources", {}).get("reference")
        else:
            real, label = reference_batches(inv, reference, max_reference), str(reference)
        real_features = embed_batches(inv, real)
        n_real = real_features.shape[0]
        report["reference"] = {"path": label, "samples": n_real}
        report["stat_loss"]["reference"] = float(np.mean(_stat_losses(inv, real)))
        report["mean_distance_std"]["reference"] = [mean_distance(inv, x) for x in real]
        report["intensity"]["reference"] = intensity_histogram(inv.space, real)
        if n_real > 1:
            report["mean_pairwise_cosine"]["reference"] = mean_pairwise_cosine(real_features)
        if n_real > 1 and paths:
            spaces = memorisation_audit(inv.model, torch.cat(samples), torch.cat(real), device=inv.device)
            report["memorisation"] = audit_summary(spaces, DEFAULT_PERCENTILE, "leave-one-out reference")
        if n_real > 1 and len(paths) > 1:
            report["frechet_distance"] = {
                "synthetic_reference": frechet_distance(synthetic, real_features),
                "noise_reference": frechet_distance(noise_features, real_features),
            }
    return report


def rep_comparison(inv: InversionEngine, num_samples: int, features: Tensor) -> dict:
    """Mean pairwise cosine with and without L_rep: ``features`` are the run's, the other is made now.

    The other inversion has the same model, statistics, seed and steps, with ``rep`` toggled; it is
    kept in memory only.
    """
    c = inv.config
    has_rep = "rep" in c.losses
    losses = tuple(t for t in c.losses if t != "rep") if has_rep else (*c.losses, "rep")
    if not losses:
        raise ValueError("cannot compare with and without L_rep when it is the only loss term")
    other = InversionEngine(
        inv.model, inv.targets, c.replace(losses=losses), device=inv.device, backend=inv.backend
    )
    other_features = other.generate(num_samples).embeddings
    if num_samples < 2:
        return {"with_rep": None, "without_rep": None}
    ours, theirs = mean_pairwise_cosine(features), mean_pairwise_cosine(other_features)
    return {"with_rep": ours if has_rep else theirs, "without_rep": theirs if has_rep else ours}


def _median(values: list[float] | None) -> float | None:
    return float(np.median(values)) if values else None


def _num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def format_report(report: dict) -> list[str]:
    """The quality report as short lines for a terminal."""
    s, cos = report["stat_loss"], report["mean_pairwise_cosine"]
    lines = [
        f"stat-matching loss: synthetic {_num(s['synthetic'])}, random noise {_num(s['noise'])}"
        + (f", real {_num(s['reference'])}" if s["reference"] is not None else ""),
        f"mean pairwise cosine: synthetic {_num(cos['synthetic'])}, noise {_num(cos['noise'])}"
        + (f", real {_num(cos['reference'])}" if cos["reference"] is not None else ""),
    ]
    d = report.get("mean_distance_std")
    if d:
        lines.append(
            f"distance of the batch mean from the target mean (median, std): synthetic "
            f"{_num(_median(d['synthetic']), 3)}, noise {_num(_median(d['noise']), 3)}"
            + (f", real {_num(_median(d['reference']), 3)}" if d["reference"] else "")
        )
    hist = report.get("intensity")
    if hist:
        for key, label in (("synthetic", "synthetic"), ("reference", "real")):
            if hist[key]:
                bands = ", ".join(f"{k} {100 * v:.0f}%" for k, v in hist[key].items())
                lines.append(f"intensity ({label}): {bands}")
    if report["rep_comparison"]:
        r = report["rep_comparison"]
        lines.append(
            f"mean pairwise cosine with L_rep {_num(r['with_rep'])}, without {_num(r['without_rep'])}"
        )
    if report["frechet_distance"]:
        f = report["frechet_distance"]
        lines.append(
            f"Frechet distance to the reference: synthetic {_num(f['synthetic_reference'])}, "
            f"noise {_num(f['noise_reference'])}"
        )
    mem = report.get("memorisation")
    if mem:
        lines.append(
            f"memorisation: {100 * mem['pixels']['score']:.1f}% (pixels), {100 * mem['features']['score']:.1f}% "
            f"(features) of synthetic samples closer to a real sample than 95% of real samples are to each "
            f"other; {len(mem['flagged_both'])} flagged in both"
        )
    return lines
