"""The forgetting experiment: ``seq``, ``er`` and ``invcoss`` on phantom modalities, then evaluated.

:func:`run_forgetting_experiment` writes deterministic phantoms of every modality of the order
(training files from seed 0, held-out files from seed 1, so no held-out scan is a training scan),
preprocesses them at the model's input size, runs :func:`invcoss.continual.run_continual` once per
method with the same configuration otherwise, scores every stage's checkpoint on the held-out data
(:func:`invcoss.continual.eval.evaluate_run`) and measures what each method keeps between stages
(:func:`invcoss.continual.eval.storage_report`).

Output folder ``OUT``::

    phantoms/{train,test}/<modality>/   cache/{train,test}/<modality>/   the data
    runs/<method>/                      one continual run per method (with eval/ inside)
    forgetting.csv  forgetting.md       the table: method x modality
    retention.png                       held-out loss per stage, one panel per modality (Fig. 6b)
    experiment.json                     the configuration, the table and the storage numbers

Sizes (:meth:`ForgettingExperiment.from_size`): ``quick`` (the default, a benchmark-style run of a
few minutes on a laptop CPU: X-ray, CT then MRI, the paper's order of these three, at the quick
profile's sizes, about 50 training samples each, with 100-200 inversion steps per batch) and ``tiny`` (CT then X-ray at 32 pixels, for the
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
from invcoss.continual.eval import RetentionTable, StorageRow, evaluate_run, storage_report
from invcoss.continual.plot import Panel, line_plot
from invcoss.continual.run import run_continual
from invcoss.data import get_config, open_dataset, preprocess, read_manifest, write_phantoms
from invcoss.data.atomic import atomic_write_bytes, atomic_write_json
from invcoss.modality import get_modality
from invcoss.models import preset_config

__all__ = ["ExperimentEvent", "ForgettingExperiment", "ForgettingResult", "run_forgetting_experiment"]

_SIZES = {
    "quick": dict(
        # 200 steps for a fresh generator and 100 after, where the quick inversion profile takes
        # 40-50 and 30: at the quick profile's own budget the synthetic replay does not yet beat
        # no replay (README, "Continual pre-training"); the paper takes 500 to 2000.
        # The first stage trains a fresh model: 96 epochs reach the plateau of its held-out loss,
        # where the profile's 16 leave it at 0.53 against 0.17 (docs/experiments.md).
        base=dict(
            order=("xray", "ct", "mri"), first_stage_epochs=96, inversion_warmup_steps=200, inversion_steps=100
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
            (('xray', 'ct', 'mri'), 200, 30)
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

    def rows(self) -> list[dict]:
        """One row per method and modality: loss after its stage, at the end, forgetting, bytes kept."""
        rows = []
        for method, table in self.tables.items():
            kept = {r.modality: r.replay_bytes for r in self.storage[method]}
            for modality, row in table.final().items():
                rows.append(
                    {
                        "method": method,
                        "modality": modality,
                        "loss_after_own_stage": row.loss_after_own_stage,
                        "loss_at_end": row.loss,
                        "forgetting": row.forgetting,
                        "replay_bytes": kept.get(modality, 0),
                    }
                )
        return rows

    def mean_forgetting(self) -> dict[str, float]:
        """Per method, the mean forgetting over the modalities before the last stage."""
        last = self.experiment.base.order[-1]
        out = {}
        for method in self.tables:
            values = [r["forgetting"] for r in self.rows() if r["method"] == method and r["modality"] != last]
            out[method] = sum(values) / len(values) if values else math.nan
        return out

    def markdown(self) -> str:
        """The summary as a Markdown table (the README's)."""
        lines = [
            "| method | modality | loss after its stage | loss at the end | forgetting | kept for replay |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in self.rows():
            lines.append(
                f"| {r['method']} | {r['modality']} | {r['loss_after_own_stage']:.4f} | {r['loss_at_end']:.4f} "
                f"| {r['forgetting']:+.4f} | {_bytes(r['replay_bytes'])} |"
            )
        return "\n".join(lines) + "\n"

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
                {
                    "experiment": self.experiment.to_dict(),
                    "rows": rows,
                    "mean_forgetting": self.mean_forgetting(),
                    "storage": {m: [dataclasses.asdict(r) for r in s] for m, s in self.storage.items()},
                    "seconds": self.seconds,
                },
            ),
        }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _prepare_data(out: Path, exp: ForgettingExperiment, emit) -> dict[str, dict[str, Path]]:
    """Phantoms and caches: ``{split: {modality: cache folder}}`` (reused when already there)."""

    model = preset_config(exp.base.preset, **exp.base.model_overrides())
    sizes = dict(exp.phantom_sizes)
    caches: dict[str, dict[str, Path]] = {"train": {}, "test": {}}
    for modality, n_train, n_test in exp.files:
        if modality not in exp.base.order:
            continue
        ndim = get_modality(modality).ndim
        config = get_config(modality, "quick", size=model.img_size(ndim), channels=model.in_chans(ndim))
        for split, count, seed in (("train", n_train, exp.seed), ("test", n_test, exp.seed + 1)):
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
    return caches


def run_forgetting_experiment(
    out: str | os.PathLike,
    experiment: ForgettingExperiment | None = None,
    resume: bool = False,
    device: str | None = None,
    on_event: Callable[[ExperimentEvent], None] | None = None,
) -> ForgettingResult:
    """Run every method on phantoms, evaluate, and write the table (module docstring).

    Args:
        out: the experiment folder.
        experiment: default ``ForgettingExperiment.from_size("quick")``.
        resume: continue the runs already in ``out`` (finished stages are kept).
        device: default: CUDA when available, else CPU.
        on_event: receives every :class:`ExperimentEvent`.

    Raises:
        ValueError: ``out`` already holds runs and ``resume`` is not set, or they were made with
            another configuration.
    """

    exp = experiment or ForgettingExperiment.from_size("quick")
    out = Path(out)
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
    caches = _prepare_data(out, exp, emit)
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
        )
        test = {m: open_dataset(c, m) for m, c in caches["test"].items()}
        tables[method] = evaluate_run(
            run,
            test,
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
    result = ForgettingResult(out, exp, tables, storage, time.perf_counter() - t0)
    result.write()
    return result
