"""The forgetting experiment: ``seq``, ``er`` and ``invcoss`` on phantom modalities, then evaluated.

:func:`run_forgetting_experiment` writes deterministic phantoms of every modality of the order
(training files from seed 0, held-out files from seed 1, so no held-out scan is a training scan),
preprocesses them at the model's input size, runs :func:`invcoss.continual.run_continual` once per
method with the same configuration otherwise, scores every stage's checkpoint on the held-out data
(:func:`invcoss.continual.eval.evaluate_run`: the loss overall, on background and structured
patches, against the normalised and the raw-pixel target, and a linear probe of the frozen
encoder on the phantoms' anatomy labels, trained on the training phantoms' samples and scored on
the held-out ones) and measures what each method keeps between stages
(:func:`invcoss.continual.eval.storage_report`).

Output folder ``OUT``::

    phantoms/{train,test}/<modality>/   cache/{train,test}/<modality>/   the data
    phantoms/<modality>_labels.csv      the probe's labels (file,sample,label,split)
    runs/<method>/                      one continual run per method (with eval/ inside)
    forgetting.csv  forgetting.md       the table: method x modality (ForgettingResult.rows)
    retention.png                       held-out loss per stage, one panel per modality (Fig. 6b)
    experiment.json                     the configuration, the table, the storage numbers and the
                                        compute settings (the CPU thread count, 1 by default)

Sizes (:meth:`ForgettingExperiment.from_size`): ``quick`` (the default, a benchmark-style run of a
few minutes on a laptop CPU: X-ray, CT then MRI, the paper's order of these three, at the quick
profile's sizes, about 50 training samples each, with 150-300 inversion steps per batch) and ``tiny`` (CT then X-ray at 32 pixels, for the
test suite).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from invcoss.continual.config import METHODS, ContinualConfig
from invcoss.continual.eval import RetentionTable, StorageRow, evaluate_run, json_safe, storage_report
from invcoss.continual.plot import Panel, line_plot
from invcoss.continual.probe import read_labelled_csv, write_labelled_csv
from invcoss.continual.run import run_continual
from invcoss.data import get_config, open_dataset, preprocess, read_manifest, write_phantoms
from invcoss.data.atomic import atomic_write_bytes, atomic_write_json
from invcoss.data.phantoms import PHANTOM_LABELS, phantom_label_rows
from invcoss.modality import get_modality
from invcoss.models import preset_config
from invcoss.rng import pinned_compute

__all__ = ["ExperimentEvent", "ForgettingExperiment", "ForgettingResult", "run_forgetting_experiment"]

EXPERIMENT_THREADS = 1  # the default thread count: the table does not depend on the machine

_SIZES = {
    "quick": dict(
        # 300 steps for a fresh generator and 150 after (the quick 3D inversion profile's budget,
        # which reaches the target statistics: docs/inversion.md), for X-ray too, where the quick
        # 2D profile takes 40 and 30; the paper takes 500 to 2000.
        # The first stage trains a fresh model: 96 epochs reach the plateau of its held-out loss,
        # where the profile's 16 leave it at 0.53 against 0.17 (docs/experiments.md).
        base=dict(
            order=("xray", "ct", "mri"), first_stage_epochs=96, inversion_warmup_steps=300, inversion_steps=150
        ),
        # At least 6 held-out phantoms per modality (12 X-rays, 72 CT windows, 30 MRI windows).
        files=(("xray", 48, 12), ("ct", 4, 6), ("mri", 10, 6)),
        phantom_sizes=(),
    ),
    "tiny": dict(
        base=dict(
            order=("ct", "xray"), img_size_2d=(32, 32), img_size_3d=(16, 32, 32), epochs=2, batch_size=4,
            stats_batch_size=4, inversion_batch_size=2, inversion_steps=2, inversion_warmup_steps=2,
            inversion_overrides=(("upsample", 1),),
        ),
        files=(("ct", 1, 1), ("xray", 8, 4)),
        phantom_sizes=(("ct", (24, 48, 48)), ("xray", (64, 64))),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ForgettingExperiment:
    """What the experiment runs.

    Attributes:
        size: the size it came from (informative).
        base: the continual configuration shared by all methods (its ``method`` is replaced).
        methods: the methods compared.
        files: ``(modality, training files, held-out files)`` per modality of ``base.order``.
        phantom_sizes: ``(modality, size)`` of the phantoms where not the default.
        eval_repeats: masks per held-out sample.
        seed: phantom seed of the training files (held-out files use ``seed + 1``).
    """

    size: str
    base: ContinualConfig
    methods: tuple[str, ...] = METHODS
    files: tuple[tuple[str, int, int], ...] = ()
    phantom_sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    eval_repeats: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        counts = {m: (a, b) for m, a, b in self.files}
        missing = [m for m in self.base.order if m not in counts]
        if missing:
            raise ValueError(f"files gives no phantom count for {', '.join(missing)}")
        if any(a < 1 or b < 1 for a, b in counts.values()):
            raise ValueError(f"phantom counts must be >= 1, got {self.files}")

    @classmethod
    def from_size(
        cls, size: str = "quick", profile: str = "quick", **base_overrides: object
    ) -> ForgettingExperiment:
        """The ``quick`` or ``tiny`` experiment on a continual profile, with base fields replaced.

        Example:
            >>> e = ForgettingExperiment.from_size("tiny")
            >>> e.base.order, e.base.img_size_3d, e.methods
            (('ct', 'xray'), (16, 32, 32), ('seq', 'er', 'invcoss'))
            >>> q = ForgettingExperiment.from_size("quick", inversion_steps=30)
            >>> q.base.order, q.base.inversion_warmup_steps, q.base.inversion_steps
            (('xray', 'ct', 'mri'), 300, 30)
        """
        if size not in _SIZES:
            raise ValueError(f"unknown experiment size {size!r}; choose one of {sorted(_SIZES)}")
        spec = _SIZES[size]
        base = ContinualConfig.from_profile(profile, **{**spec["base"], **base_overrides})
        return cls(size=size, base=base, files=spec["files"], phantom_sizes=spec["phantom_sizes"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExperimentEvent:
    """Progress: ``phase`` is ``data``, ``continual`` (``event`` holds the run's event) or ``evaluate``."""

    phase: str
    method: str | None
    info: dict


@dataclass
class ForgettingResult:
    """Per method, its retention table and storage rows; ``rows()`` is the summary table."""

    out: Path
    experiment: ForgettingExperiment
    tables: dict[str, RetentionTable]
    storage: dict[str, list[StorageRow]]
    seconds: float
    compute: dict = dataclasses.field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One flat row per method and modality, every value a number (NaN where there is none).

        Columns: the held-out loss after the modality's own stage and at the end, and the
        forgetting (end minus after), overall, on background and on structured patches, and the
        same against the raw pixels (``raw_*``); the background fraction of the masked patches;
        the probe accuracy after the own stage and at the end and its drop
        (``probe_forgetting``, positive: forgotten); the bytes kept for replay.
        """
        rows = []
        for method, table in self.tables.items():
            kept = {r.modality: r.replay_bytes for r in self.storage[method]}
            for modality, row in table.final().items():
                total = row.background_patches + row.structured_patches
                rows.append(
                    {
                        "method": method,
                        "modality": modality,
                        "loss_after_own_stage": row.loss_after_own_stage,
                        "loss_at_end": row.loss,
                        "forgetting": row.forgetting,
                        "loss_background_at_end": row.loss_background,
                        "forgetting_background": row.forgetting_background,
                        "loss_structured_at_end": row.loss_structured,
                        "forgetting_structured": row.forgetting_structured,
                        "raw_loss_at_end": row.raw_loss,
                        "raw_forgetting": row.raw_forgetting,
                        "raw_forgetting_background": row.raw_forgetting_background,
                        "raw_forgetting_structured": row.raw_forgetting_structured,
                        "background_fraction": row.background_patches / total if total else math.nan,
                        "probe_accuracy_after_own_stage": _number(row.probe_accuracy_after_own_stage),
                        "probe_accuracy_at_end": _number(row.probe_accuracy),
                        "probe_forgetting": _number(row.probe_forgetting),
                        "replay_bytes": kept.get(modality, 0),
                    }
                )
        return rows

    def mean_forgetting(self, field: str = "forgetting") -> dict[str, float]:
        """Per method, the mean of ``field`` over the modalities before the last stage (NaN left out)."""
        last = self.experiment.base.order[-1]
        out = {}
        for method in self.tables:
            values = [r[field] for r in self.rows() if r["method"] == method and r["modality"] != last]
            values = [v for v in values if not math.isnan(v)]
            out[method] = sum(values) / len(values) if values else math.nan
        return out

    def markdown(self) -> str:
        """The summary as a Markdown table (the README's).

        ``background`` / ``structured``: the forgetting on those patches; ``raw pixels``: the
        forgetting against the raw-pixel target; ``probe``: the probe accuracy after the own stage
        and at the end. ``n/a``: no such patch, or no probe.
        """
        lines = [
            "| method | modality | loss after its stage | loss at the end | forgetting | background | structured "
            "| raw pixels | probe | kept for replay |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows():
            probe = (
                f"{r['probe_accuracy_after_own_stage']:.2f} → {r['probe_accuracy_at_end']:.2f}"
                if not math.isnan(r["probe_accuracy_at_end"])
                else "n/a"
            )
            lines.append(
                f"| {r['method']} | {r['modality']} | {r['loss_after_own_stage']:.4f} | {r['loss_at_end']:.4f} "
                f"| {r['forgetting']:+.4f} | {_signed(r['forgetting_background'])} "
                f"| {_signed(r['forgetting_structured'])} | {_signed(r['raw_forgetting'])} | {probe} "
                f"| {_bytes(r['replay_bytes'])} |"
            )
        return "\n".join(lines) + "\n"

    def evaluation_settings(self) -> dict:
        """Per modality, the background threshold and fraction and the probe's class counts."""
        table = next(iter(self.tables.values()))
        keys = ("background_std", "background_fraction", "probe", "probe_classes")
        return {k: table.settings.get(k, {}) for k in keys}

    def write(self) -> dict[str, Path]:
        import csv
        import io

        buf = io.StringIO()
        rows = self.rows()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        order = self.experiment.base.order
        labels = [f"{k + 1} {m}" for k, m in enumerate(order)]
        panels = [
            Panel(f"{m}: held-out loss", labels, {method: t.curve(m) for method, t in self.tables.items()})
            for m in order
        ]
        return {
            "csv": atomic_write_bytes(self.out / "forgetting.csv", buf.getvalue().encode()),
            "md": atomic_write_bytes(self.out / "forgetting.md", self.markdown().encode()),
            "png": line_plot(
                self.out / "retention.png", panels, "held-out masked-reconstruction loss per stage"
            ),
            "json": atomic_write_json(
                self.out / "experiment.json",
                json_safe(
                    {
                        "experiment": self.experiment.to_dict(),
                        "rows": rows,
                        "mean_forgetting": self.mean_forgetting(),
                        "mean_forgetting_by_column": {f: self.mean_forgetting(f) for f in _MEAN_FIELDS},
                        "evaluation": self.evaluation_settings(),
                        "storage": {m: [dataclasses.asdict(r) for r in s] for m, s in self.storage.items()},
                        "seconds": self.seconds,
                        "compute": self.compute,
                    }
                ),
            ),
        }


_MEAN_FIELDS = (
    "forgetting", "forgetting_background", "forgetting_structured", "raw_forgetting", "probe_forgetting",
)  # fmt: skip


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.4f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _prepare_data(
    out: Path, exp: ForgettingExperiment, emit
) -> tuple[dict[str, dict[str, Path]], dict[str, Path]]:
    """Phantoms, caches and probe labels (reused when already there).

    Returns ``{split: {modality: cache folder}}`` and ``{modality: labelled CSV}`` (the anatomy of
    every training and held-out sample, :func:`invcoss.data.phantoms.phantom_labels`).
    """

    model = preset_config(exp.base.preset, **exp.base.model_overrides())
    sizes = dict(exp.phantom_sizes)
    caches: dict[str, dict[str, Path]] = {"train": {}, "test": {}}
    labels: dict[str, Path] = {}
    for modality, n_train, n_test in exp.files:
        if modality not in exp.base.order:
            continue
        ndim = get_modality(modality).ndim
        config = get_config(modality, "quick", size=model.img_size(ndim), channels=model.in_chans(ndim))
        splits = (("train", n_train, exp.seed), ("test", n_test, exp.seed + 1))
        written = False
        for split, count, seed in splits:
            src, cache = out / "phantoms" / split / modality, out / "cache" / split / modality
            caches[split][modality] = cache
            try:
                if len(read_manifest(cache)["sources"]) == count:
                    continue
            except (OSError, ValueError):
                pass
            emit("data", None, modality=modality, split=split, files=count)
            write_phantoms(src, modality, count, seed=seed, size=sizes.get(modality))
            preprocess(src, cache, modality, config=config)
            written = True
        if modality not in PHANTOM_LABELS:
            continue
        labels[modality] = path = out / "phantoms" / f"{modality}_labels.csv"
        if written or not path.is_file():
            emit("data", None, modality=modality, split="labels", files=n_train + n_test)
            rows = [
                (file, k, label, split)
                for split, count, seed in splits
                for file, k, label in phantom_label_rows(
                    out / "phantoms" / split / modality,
                    modality,
                    count,
                    seed,
                    sizes.get(modality),
                    config=config,
                )
            ]
            write_labelled_csv(path, rows)
    return caches, labels


def run_forgetting_experiment(
    out: str | os.PathLike,
    experiment: ForgettingExperiment | None = None,
    resume: bool = False,
    device: str | None = None,
    on_event: Callable[[ExperimentEvent], None] | None = None,
    threads: int = EXPERIMENT_THREADS,
) -> ForgettingResult:
    """Run every method on phantoms, evaluate, and write the table (module docstring).

    Args:
        out: the experiment folder.
        experiment: default ``ForgettingExperiment.from_size("quick")``.
        resume: continue the runs already in ``out`` (finished stages are kept).
        device: default: CUDA when available, else CPU.
        on_event: receives every :class:`ExperimentEvent`.
        threads: torch's CPU threads for the whole experiment (:func:`invcoss.rng.pinned_compute`);
            1 by default, so the numbers do not depend on the machine's core count. Recorded as
            ``compute`` in ``experiment.json`` and in every run and evaluation.

    Raises:
        ValueError: ``out`` already holds runs and ``resume`` is not set, or they were made with
            another configuration or thread count.
    """
    with pinned_compute(threads) as compute:
        return _run_experiment(Path(out), experiment, resume, device, on_event, compute)


def _run_experiment(
    out: Path,
    experiment: ForgettingExperiment | None,
    resume: bool,
    device: str | None,
    on_event: Callable[[ExperimentEvent], None] | None,
    compute: dict,
) -> ForgettingResult:
    exp = experiment or ForgettingExperiment.from_size("quick")
    t0 = time.perf_counter()

    def emit(phase: str, method: str | None, **info) -> None:
        if on_event is not None:
            on_event(ExperimentEvent(phase, method, info))

    if not resume:
        existing = [m for m in exp.methods if (out / "runs" / m / "continual.json").exists()]
        if existing:
            raise ValueError(
                f"{out} already holds runs of {', '.join(existing)}; pass resume=True (--resume)"
            )
    caches, label_files = _prepare_data(out, exp, emit)
    model = preset_config(exp.base.preset, **exp.base.model_overrides())
    labelled = {}
    for m, path in label_files.items():
        ndim = get_modality(m).ndim
        labelled[m] = read_labelled_csv(path, m, model.img_size(ndim), channels=model.in_chans(ndim))
    tables, storage = {}, {}
    for method in exp.methods:
        run = out / "runs" / method
        train = {m: (lambda c=c, m=m: open_dataset(c, m)) for m, c in caches["train"].items()}
        run_continual(
            train,
            run,
            exp.base.replace(method=method),
            resume=resume,
            device=device,
            on_event=lambda e, method=method: emit("continual", method, event=e),
            threads=compute["threads"],
        )
        test = {m: open_dataset(c, m) for m, c in caches["test"].items()}
        tables[method] = evaluate_run(
            run,
            test,
            labelled,
            repeats=exp.eval_repeats,
            seed=exp.seed,
            batch_size=exp.base.stats_batch_size,
            device=device,
            on_progress=lambda done, total, what, method=method: emit(
                "evaluate", method, done=done, total=total, what=what
            ),
        )
        tables[method].write(run / "eval")
        storage[method] = storage_report(run)
    result = ForgettingResult(out, exp, tables, storage, time.perf_counter() - t0, compute)
    result.write()
    return result
