"""Evaluating a continual run: knowledge retention, forgetting, probe accuracy and storage (Fig. 6).

- :func:`reconstruction_loss`: the held-out masked-reconstruction loss (Eq. 7) of a model on a data
  set, with mask noise fixed by a seed, so that every checkpoint hides the same patches.
- :func:`evaluate_run`: for every finished stage's checkpoint, the loss on every modality seen so
  far, its forgetting (the loss now minus the loss right after the modality's own stage; positive
  means forgotten) and, for modalities with a labelled set, the linear-probe accuracy
  (:mod:`invcoss.continual.probe`). :meth:`RetentionTable.write` saves CSV, JSON and a PNG of the
  retention curves (Fig. 6b).
- :func:`storage_report`: the bytes a method keeps between stages (Fig. 6a): the checkpoint, plus
  the real buffer (``er``) or the feature statistics (``invcoss``) of every finished stage.
"""

from __future__ import annotations

import csv
import io
import json
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

__all__ = [
    "RetentionRow",
    "RetentionTable",
    "StorageRow",
    "evaluate_run",
    "finished_stages",
    "reconstruction_loss",
    "storage_report",
]


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

    The mask noise of sample ``i`` and repeat ``r`` depends only on ``(seed, len(data), tokens)``,
    so two checkpoints of one architecture are scored on exactly the same hidden patches.

    Args:
        model: an :class:`invcoss.models.MAE`.
        data: a Dataset of ``(C, *S)`` samples or an ``(N, C, *S)`` tensor.
        mask_ratio: fraction of patches hidden.
        repeats: masks per sample (averaged), to lower the variance of a small held-out set.
        seed: seeds the masks.
        batch_size: samples per forward pass.
        device: default: the model's.

    Example:
        >>> from invcoss.models import create_model
        >>> m = create_model("vit_nano", img_size_2d=32)
        >>> x = torch.rand(5, 3, 32, 32)
        >>> a, b = reconstruction_loss(m, x, batch_size=2), reconstruction_loss(m, x, batch_size=5)
        >>> abs(a - b) < 1e-6, a == reconstruction_loss(m, x, batch_size=2)
        (True, True)
    """
    from torch.utils.data import DataLoader

    n = len(data)
    if n == 0:
        raise ValueError("reconstruction_loss got an empty data set")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    noise = None
    total, start = 0.0, 0
    try:
        with torch.no_grad():
            # A private generator: a DataLoader draws a base seed from the global one otherwise.
            for x in DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
                x = (x[0] if isinstance(x, list | tuple) else x).to(dev)
                if noise is None:
                    tokens = model.config.num_patches(x.ndim - 2)
                    noise = torch.rand(repeats, n, tokens, generator=torch.Generator().manual_seed(seed))
                b = x.shape[0]
                for r in range(repeats):
                    # Every sample hides the same number of patches, so the batch mean times b is
                    # the sum of the per-sample losses.
                    loss = model(x, mask_ratio, noise=noise[r, start : start + b].to(dev))[0]
                    total += float(loss) * b
                start += b
    finally:
        model.train(was_training)
    return total / (n * repeats)


@dataclass
class RetentionRow:
    """One (checkpoint, modality) score; ``stage`` is 1-based."""

    stage: int
    stage_modality: str
    modality: str
    loss: float
    loss_after_own_stage: float
    forgetting: float
    probe_accuracy: float | None = None


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

    def mean_forgetting(self) -> float | None:
        """Mean forgetting at the last evaluated stage over the modalities trained before it.

        The modality of the last evaluated stage cannot have been forgotten yet and is left out;
        None when no earlier modality was evaluated.
        """
        if not self.rows:
            return None
        last = self.order[max(r.stage for r in self.rows) - 1]
        earlier = [r.forgetting for m, r in self.final().items() if m != last]
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
                {"run": str(self.run), "method": self.method, "order": list(self.order),
                 "settings": self.settings, "rows": [asdict(r) for r in self.rows]},
            ),
        }  # fmt: skip
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
        if panels:
            paths["png"] = line_plot(out / "retention.png", panels, f"knowledge retention: {self.run.name}")
        return paths


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
) -> RetentionTable:
    """Score every finished stage's checkpoint on the held-out data of every modality seen so far.

    Args:
        run: a continual run folder.
        data: per modality, its held-out Dataset (or ``(N, C, *S)`` tensor) at the model's size.
            Modalities of the order without data are left out.
        labelled: per modality, a :class:`~invcoss.continual.probe.LabelledSet` for the probe.
        mask_ratio, repeats, seed, batch_size: see :func:`reconstruction_loss`.
        device: default: CUDA when available, else CPU.
        on_progress: called as ``on_progress(done, total, what)`` after each score.

    Returns:
        :class:`RetentionTable`.

    Raises:
        ValueError: not a run folder, no finished stage, or a modality outside the run's order.
    """

    run = Path(run)
    config = read_run(run)
    labelled = dict(labelled or {})
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
    jobs = sum(1 for t, _, _ in stages for m in config.order[: t + 1] if m in data)
    done = 0
    own: dict[str, float] = {}
    rows = []
    for t, stage_modality, folder in stages:
        model = MAE.from_pretrained(folder).to(dev)
        for m in config.order[: t + 1]:
            if m not in data:
                continue
            loss = reconstruction_loss(model, data[m], mask_ratio, repeats, seed, batch_size, dev)
            own.setdefault(m, loss)
            acc = probe_accuracy(model, labelled[m], batch_size, dev) if m in labelled else None
            rows.append(RetentionRow(t + 1, stage_modality, m, loss, own[m], loss - own[m], acc))
            done += 1
            if on_progress is not None:
                on_progress(done, jobs, f"stage {t + 1} {m}")
    settings = {
        "mask_ratio": mask_ratio, "repeats": repeats, "seed": seed,
        "samples": {m: len(data[m]) for m in data}, "probe": {m: str(s.source) for m, s in labelled.items()},
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
