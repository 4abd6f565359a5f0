"""Evaluating a continual run: knowledge retention, forgetting, probe accuracy and storage (Fig. 6).

- :func:`reconstruction_scores`: the held-out masked-reconstruction loss (Eq. 7) of a model on a
  data set, with mask noise fixed by a seed, so that every checkpoint hides the same patches;
  overall and split by region (background patches, whose raw pixels vary less than
  ``BACKGROUND_STD`` of the modality, and structured patches), each against the training target
  (per-patch normalised) and against the raw pixels. :func:`reconstruction_loss` is its overall
  loss.
- :func:`evaluate_run`: for every finished stage's checkpoint, those losses on every modality seen
  so far, their forgetting (the loss now minus the loss right after the modality's own stage;
  positive means forgotten) and, for modalities with a labelled set, the linear-probe accuracy on
  the frozen encoder (:mod:`invcoss.continual.probe`) and its drop since the own stage.
  :meth:`RetentionTable.write` saves CSV, JSON and a PNG of the retention curves (Fig. 6b).
- :func:`storage_report`: the bytes a method keeps between stages (Fig. 6a): the checkpoint, plus
  the real buffer (``er``) or the feature statistics (``invcoss``) of every finished stage.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from invcoss.continual.layout import BUFFER_NAME, STAGE_NAME, STATS_NAME, read_run, stage_dir
from invcoss.continual.plot import Panel, line_plot
from invcoss.continual.probe import LabelledSet, probe_accuracy
from invcoss.data.atomic import atomic_write_bytes, atomic_write_json
from invcoss.models import MAE
from invcoss.rng import compute_record

__all__ = [
    "BACKGROUND_STD",
    "LOSS_VARIANTS",
    "ReconstructionScores",
    "RetentionRow",
    "RetentionTable",
    "StorageRow",
    "evaluate_run",
    "background_patches",
    "finished_stages",
    "json_safe",
    "reconstruction_loss",
    "reconstruction_scores",
    "storage_report",
]


# A patch is background when the standard deviation of its raw target pixels (model units) is below
# this: noise and nothing else, which the per-patch normalised target turns into unpredictable
# unit-variance noise. Measured on the phantoms at the quick sizes (docs/continual.md): CT air
# patches have std 0.0036-0.0056 (after resampling and resizing) and all but a few percent of the
# others exceed 0.01 (10 HU); MRI background (Rician noise, z-scored volume) 0.015-0.045, the head
# 0.1 and more; X-ray and pathology pictures in [0, 1] get the CT threshold (detector noise; the
# X-ray phantoms have no patch below 0.016, their body fills the field).
BACKGROUND_STD = {"ct": 0.01, "mri": 0.05, "xray": 0.01, "pathology": 0.01}


def background_patches(model: nn.Module, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B, L)`` bool: True where the std of the patch's raw pixels is below ``threshold``.

    ``x: (B, C, *S)`` at the model's input size; the std is over all pixels and channels of the
    patch (``model.patchify``), unbiased.

    Example:
        >>> from invcoss.models import create_model
        >>> m = create_model("vit_nano", img_size_2d=32)
        >>> x = torch.full((1, 3, 32, 32), 0.5); x[..., :16, :16] = torch.rand(3, 16, 16)
        >>> background_patches(m, x, 0.01).tolist()
        [[False, True, True, True]]
    """
    return model.patchify(x).float().std(dim=-1) < threshold


@dataclass
class ReconstructionScores:
    """Held-out masked-reconstruction losses overall and per patch region, for two targets.

    ``loss*``: the training target (Eq. 7, per-patch normalised with ``norm_pix_loss``);
    ``raw_loss*``: the same predictions scored against the raw pixels (mapped back with each
    target patch's mean and standard deviation when the model predicts standardised patches:
    :meth:`invcoss.models.MAE.patch_losses`). ``*_background`` /
    ``*_structured``: the mean over the masked patches of that region (:func:`background_patches`),
    NaN when the region has none; ``*_patches``: how many masked patches (summed over repeats)
    each region holds, so that ``loss`` is their count-weighted mean.
    """

    loss: float
    loss_background: float
    loss_structured: float
    raw_loss: float
    raw_loss_background: float
    raw_loss_structured: float
    background_patches: int
    structured_patches: int

    @property
    def background_fraction(self) -> float:
        return self.background_patches / max(1, self.background_patches + self.structured_patches)


def reconstruction_scores(
    model: nn.Module,
    data,
    mask_ratio: float = 0.75,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    background_std: float = BACKGROUND_STD["ct"],
) -> ReconstructionScores:
    """Masked-reconstruction losses of ``model`` over ``data`` in eval mode, overall and per region.

    The mask noise of sample ``i`` and repeat ``r`` depends only on ``(seed, len(data), tokens)``,
    so two checkpoints of one architecture are scored on exactly the same hidden patches. Every
    masked patch's loss is computed once against the normalised and once against the raw target
    (:meth:`invcoss.models.MAE.patch_losses`); a region's loss is the mean over its masked patches.

    Args:
        model: an :class:`invcoss.models.MAE`.
        data: a Dataset of ``(C, *S)`` samples or an ``(N, C, *S)`` tensor.
        mask_ratio: fraction of patches hidden.
        repeats: masks per sample (averaged), to lower the variance of a small held-out set.
        seed: seeds the masks.
        batch_size: samples per forward pass.
        device: default: the model's.
        background_std: the background threshold (``BACKGROUND_STD`` of the data's modality).

    Raises:
        ValueError: an empty data set, ``repeats < 1`` or a negative ``background_std``.

    Example:
        >>> from invcoss.models import create_model
        >>> m = create_model("vit_nano", img_size_2d=32)
        >>> s = reconstruction_scores(m, torch.rand(5, 3, 32, 32), batch_size=2)
        >>> s.background_patches, s.structured_patches, s.loss == s.loss_structured
        (0, 30, True)
    """
    from torch.utils.data import DataLoader

    n = len(data)
    if n == 0:
        raise ValueError("reconstruction_loss got an empty data set")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not background_std >= 0:
        raise ValueError(f"background_std must be >= 0, got {background_std}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    noise = None
    # Sums of per-patch losses (float64) and counts: [normalised, raw] x [background, structured].
    sums = torch.zeros(2, 2, dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)
    start = 0
    try:
        with torch.no_grad():
            # A private generator: a DataLoader draws a base seed from the global one otherwise.
            for x in DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
                x = (x[0] if isinstance(x, list | tuple) else x).to(dev)
                if noise is None:
                    tokens = model.config.num_patches(x.ndim - 2)
                    noise = torch.rand(repeats, n, tokens, generator=torch.Generator().manual_seed(seed))
                b = x.shape[0]
                background = background_patches(model, x, background_std)  # (b, L)
                for r in range(repeats):
                    _, pred, mask = model(x, mask_ratio, noise=noise[r, start : start + b].to(dev))
                    masked = mask.bool()
                    groups = (masked & background, masked & ~background)
                    for t, norm_pix in enumerate((None, False)):
                        per_patch = model.patch_losses(x, pred, norm_pix=norm_pix).double()  # (b, L)
                        for g, where in enumerate(groups):
                            sums[t, g] += per_patch[where].sum().cpu()
                    counts += torch.tensor([float(w.sum()) for w in groups], dtype=torch.float64)
                start += b
    finally:
        model.train(was_training)
    total = float(counts.sum())

    def mean(t: int, g: int | None) -> float:
        if g is None:
            return float(sums[t].sum()) / total
        return float(sums[t, g]) / float(counts[g]) if counts[g] > 0 else math.nan

    return ReconstructionScores(
        loss=mean(0, None), loss_background=mean(0, 0), loss_structured=mean(0, 1),
        raw_loss=mean(1, None), raw_loss_background=mean(1, 0), raw_loss_structured=mean(1, 1),
        background_patches=int(counts[0]), structured_patches=int(counts[1]),
    )  # fmt: skip


def reconstruction_loss(
    model: nn.Module,
    data,
    mask_ratio: float = 0.75,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> float:
    """Mean masked-reconstruction loss (Eq. 7) of ``model`` over ``data`` in eval mode.

    The ``loss`` of :func:`reconstruction_scores` (same arguments): every sample hides the same
    number of patches, so it is also the mean of the per-sample losses.

    Example:
        >>> from invcoss.models import create_model
        >>> m = create_model("vit_nano", img_size_2d=32)
        >>> x = torch.rand(5, 3, 32, 32)
        >>> a, b = reconstruction_loss(m, x, batch_size=2), reconstruction_loss(m, x, batch_size=5)
        >>> abs(a - b) < 1e-6, a == reconstruction_loss(m, x, batch_size=2)
        (True, True)
    """
    return reconstruction_scores(model, data, mask_ratio, repeats, seed, batch_size, device).loss


# The loss variants of a row: (loss field, forgetting field), from ReconstructionScores.
LOSS_VARIANTS = (
    ("loss", "forgetting"),
    ("loss_background", "forgetting_background"),
    ("loss_structured", "forgetting_structured"),
    ("raw_loss", "raw_forgetting"),
    ("raw_loss_background", "raw_forgetting_background"),
    ("raw_loss_structured", "raw_forgetting_structured"),
)


@dataclass
class RetentionRow:
    """One (checkpoint, modality) score; ``stage`` is 1-based.

    Every loss of :class:`ReconstructionScores` comes with its forgetting: the loss now minus the
    loss right after the modality's own stage (positive: forgotten; NaN where the region has no
    patch). ``probe_forgetting`` is the probe accuracy right after the own stage minus the
    accuracy now (positive: forgotten), None without a labelled set.
    """

    stage: int
    stage_modality: str
    modality: str
    loss: float
    loss_after_own_stage: float
    forgetting: float
    probe_accuracy: float | None = None
    loss_background: float = math.nan
    forgetting_background: float = math.nan
    loss_structured: float = math.nan
    forgetting_structured: float = math.nan
    raw_loss: float = math.nan
    raw_forgetting: float = math.nan
    raw_loss_background: float = math.nan
    raw_forgetting_background: float = math.nan
    raw_loss_structured: float = math.nan
    raw_forgetting_structured: float = math.nan
    background_patches: int = 0
    structured_patches: int = 0
    probe_accuracy_after_own_stage: float | None = None
    probe_forgetting: float | None = None

    @classmethod
    def from_scores(
        cls,
        stage: int,
        stage_modality: str,
        modality: str,
        scores: ReconstructionScores,
        own: ReconstructionScores,
        probe: float | None = None,
        own_probe: float | None = None,
    ) -> RetentionRow:
        """The row of ``scores`` now, against ``own`` (the scores right after the own stage)."""
        fields = {}
        for loss, forgetting in LOSS_VARIANTS:
            fields[loss] = getattr(scores, loss)
            fields[forgetting] = getattr(scores, loss) - getattr(own, loss)
        return cls(
            stage=stage, stage_modality=stage_modality, modality=modality,
            loss_after_own_stage=own.loss, probe_accuracy=probe,
            background_patches=scores.background_patches, structured_patches=scores.structured_patches,
            probe_accuracy_after_own_stage=own_probe,
            probe_forgetting=own_probe - probe if probe is not None and own_probe is not None else None,
            **fields,
        )  # fmt: skip


def json_safe(value):
    """``value`` with every NaN float replaced by None (JSON has no NaN), through dicts and lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass
class RetentionTable:
    """All scores of one run, with the run's method and order and the scoring ``settings``."""

    run: Path
    method: str
    order: tuple[str, ...]
    rows: list[RetentionRow]
    settings: dict = field(default_factory=dict)

    def final(self) -> dict[str, RetentionRow]:
        """Per modality, its row at the last evaluated stage."""
        out: dict[str, RetentionRow] = {}
        for row in self.rows:
            if row.modality not in out or row.stage > out[row.modality].stage:
                out[row.modality] = row
        return out

    def mean_forgetting(self, field: str = "forgetting") -> float | None:
        """Mean ``field`` at the last evaluated stage over the modalities trained before it.

        The modality of the last evaluated stage cannot have been forgotten yet and is left out,
        and so are NaN and None values (a region without patches, no probe); None when nothing
        is left.
        """
        if not self.rows:
            return None
        last = self.order[max(r.stage for r in self.rows) - 1]
        earlier = [getattr(r, field) for m, r in self.final().items() if m != last]
        earlier = [v for v in earlier if v is not None and not math.isnan(v)]
        return sum(earlier) / len(earlier) if earlier else None

    def curve(self, modality: str, field: str = "loss") -> list[float | None]:
        """``field`` of ``modality`` at every stage of the order (None before it was seen)."""
        by_stage = {r.stage: getattr(r, field) for r in self.rows if r.modality == modality}
        return [by_stage.get(k + 1) for k in range(len(self.order))]

    def stage_labels(self) -> list[str]:
        return [f"{k + 1} {m}" for k, m in enumerate(self.order)]

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = ["method", *RetentionRow.__dataclass_fields__]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for row in self.rows:
            w.writerow({"method": self.method} | asdict(row))
        return buf.getvalue()

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """``retention.csv``, ``retention.json`` and ``retention.png`` in folder ``out``."""
        out = Path(out)
        paths = {
            "csv": atomic_write_bytes(out / "retention.csv", self.to_csv().encode()),
            "json": atomic_write_json(
                out / "retention.json",
                json_safe({"run": str(self.run), "method": self.method, "order": list(self.order),
                           "settings": self.settings, "rows": [asdict(r) for r in self.rows]}),
            ),
        }  # fmt: skip
        png = self.plot(out / "retention.png")
        if png is not None:
            paths["png"] = png
        return paths

    def plot(self, path: str | os.PathLike) -> Path | None:
        """The retention PNG: per modality its held-out loss (and probe accuracy) at every stage;
        None when there is no row to draw."""
        modalities = list(dict.fromkeys(r.modality for r in self.rows))
        panels = [
            Panel(f"{m}: held-out loss", self.stage_labels(), {self.method: self.curve(m)})
            for m in modalities
        ]
        for m in modalities:
            acc = self.curve(m, "probe_accuracy")
            if any(v is not None for v in acc):
                panels.append(
                    Panel(f"{m}: probe accuracy", self.stage_labels(), {self.method: acc}, "accuracy")
                )
        if not panels:
            return None
        return line_plot(path, panels, f"knowledge retention: {self.run.name}")

    @classmethod
    def read(cls, path: str | os.PathLike) -> RetentionTable:
        """The table :meth:`write` saved as ``retention.json`` (missing values stay None)."""
        d = json.loads(Path(path).read_text())
        rows = [RetentionRow(**r) for r in d["rows"]]
        return cls(Path(d["run"]), d["method"], tuple(d["order"]), rows, d.get("settings", {}))


def finished_stages(run: str | os.PathLike) -> list[tuple[int, str, Path]]:
    """``(index, modality, folder)`` of every finished stage of a run, in order."""
    config = read_run(run)
    out = []
    for t, m in enumerate(config.order):
        folder = stage_dir(run, t, m)
        try:
            done = json.loads((folder / STAGE_NAME).read_text()).get("done")
        except (OSError, ValueError):
            done = False
        if not done:
            break
        out.append((t, m, folder))
    return out


def evaluate_run(
    run: str | os.PathLike,
    data: Mapping[str, object],
    labelled: Mapping[str, LabelledSet] | None = None,
    mask_ratio: float = 0.75,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    background_std: Mapping[str, float] | None = None,
) -> RetentionTable:
    """Score every finished stage's checkpoint on the held-out data of every modality seen so far.

    Args:
        run: a continual run folder.
        data: per modality, its held-out Dataset (or ``(N, C, *S)`` tensor) at the model's size.
            Modalities of the order without data are left out.
        labelled: per modality with ``data``, a :class:`~invcoss.continual.probe.LabelledSet` for
            the probe, scored at every stage from the modality's own on.
        mask_ratio, repeats, seed, batch_size: see :func:`reconstruction_scores`.
        device: default: CUDA when available, else CPU.
        on_progress: called as ``on_progress(done, total, what)`` after each score.
        background_std: per modality, the background threshold (default ``BACKGROUND_STD``).

    Returns:
        :class:`RetentionTable`; its ``settings`` record the thresholds, the background fraction
        of every modality's masked patches and the probe's class counts per side.

    Raises:
        ValueError: not a run folder, no finished stage, or a modality outside the run's order.
    """

    run = Path(run)
    config = read_run(run)
    labelled = dict(labelled or {})
    thresholds = {**BACKGROUND_STD, **(background_std or {})}
    stray = sorted((set(data) | set(labelled)) - set(config.order))
    if stray:
        raise ValueError(f"{', '.join(stray)} not in the run's order {','.join(config.order)}")
    stages = finished_stages(run)
    if not stages:
        raise ValueError(f"{run} has no finished stage to evaluate")
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    seen = [m for t, _, _ in stages for m in config.order[: t + 1]]
    jobs = sum(1 for m in seen if m in data)
    done = 0
    own: dict[str, ReconstructionScores] = {}
    own_probe: dict[str, float] = {}
    background: dict[str, float] = {}
    rows = []
    for t, stage_modality, folder in stages:
        model = MAE.from_pretrained(folder).to(dev)
        for m in config.order[: t + 1]:
            if m not in data:
                continue
            scores = reconstruction_scores(
                model, data[m], mask_ratio, repeats, seed, batch_size, dev, thresholds[m]
            )
            own.setdefault(m, scores)
            background[m] = scores.background_fraction
            acc = probe_accuracy(model, labelled[m], batch_size, dev) if m in labelled else None
            if acc is not None:
                own_probe.setdefault(m, acc)
            rows.append(
                RetentionRow.from_scores(t + 1, stage_modality, m, scores, own[m], acc, own_probe.get(m))
            )
            done += 1
            if on_progress is not None:
                on_progress(done, jobs, f"stage {t + 1} {m}")
    settings = {
        "mask_ratio": mask_ratio, "repeats": repeats, "seed": seed,
        "samples": {m: len(data[m]) for m in data},
        "background_std": {m: thresholds[m] for m in data}, "background_fraction": background,
        "probe": {m: str(s.source) for m, s in labelled.items()},
        "probe_classes": {m: s.class_counts() for m, s in labelled.items()},
        "compute": compute_record(),
    }  # fmt: skip
    return RetentionTable(run, config.method, config.order, rows, settings)


@dataclass
class StorageRow:
    """Bytes kept for one finished stage.

    ``replay_bytes``: what the method keeps of that stage's data for later stages (``er``: the
    real buffer file; ``invcoss``: the statistics file; ``seq``: nothing). ``checkpoint_bytes``:
    the stage's ``model.safetensors`` + ``config.json``. ``data_bytes``: the stage's real data as
    float32 samples, uncompressed like the buffer (the paper's Fig. 6a counts storage without
    compression); ``source_bytes``: its source files when known (often compressed).
    """

    stage: int
    modality: str
    method: str
    replay_bytes: int
    checkpoint_bytes: int
    data_bytes: int
    source_bytes: int | None = None

    @property
    def kept_after(self) -> str:
        return "buffer" if self.method == "er" else "statistics" if self.method == "invcoss" else "nothing"


def storage_report(run: str | os.PathLike) -> list[StorageRow]:
    """Per finished stage, the bytes the run's method keeps between stages (Fig. 6a).

    What is carried into stage ``k+1`` is the checkpoint of stage ``k`` plus the ``replay_bytes``
    of stages ``1..k``.
    """
    config = read_run(run)
    rows = []
    for t, m, folder in finished_stages(run):
        summary = json.loads((folder / STAGE_NAME).read_text())
        replay = {"er": folder / BUFFER_NAME, "invcoss": folder / STATS_NAME}.get(config.method)
        checkpoint = sum((folder / n).stat().st_size for n in ("model.safetensors", "config.json"))
        rows.append(
            StorageRow(
                stage=t + 1,
                modality=m,
                method=config.method,
                replay_bytes=replay.stat().st_size if replay is not None else 0,
                checkpoint_bytes=checkpoint,
                data_bytes=int(summary["sample_bytes"]),
                source_bytes=summary.get("source_bytes"),
            )
        )
    return rows
