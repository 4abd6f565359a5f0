"""The forgetting experiment repeated over seeds: mean +- sd, paired differences and intervals.

:func:`run_seeds` runs :func:`~invcoss.continual.experiment.run_forgetting_experiment` ``seeds``
times, each a full repeat of the pipeline with its own seed (:func:`seed_experiment`): repeat
``k`` writes its training phantoms from seed ``s + 2k`` and its held-out phantoms from ``s + 2k + 1``
(``s`` the experiment's ``seed``; so no held-out scan is a training scan of any repeat), and its
continual runs (initial weights, shuffling, masking, buffer choice, inversion) use
``base.seed + k``. Then :func:`aggregate` summarises the repeats' tables:

- every numeric column of :meth:`~invcoss.continual.experiment.ForgettingResult.rows` (whatever
  columns the table has) as mean +- sd over seeds, per method and modality, and on ``mean``: the
  mean over the modalities trained before the last stage;
- paired differences between methods (``invcoss - seq``, ``invcoss - er``, ``er - seq``) of the
  compared columns (default: every column whose name contains ``forgetting``), per modality (for
  a forgetting column, the modalities before the last stage) and on ``mean``: mean, sd, paired t and
  a percentile bootstrap interval over seeds (:mod:`invcoss.continual.paired`).

Output folder ``OUT``::

    seed-<k>/                     one forgetting experiment per repeat (its own layout)
    seeds.csv  seeds.md           mean +- sd per method and modality; the paired differences
    seeds_paired.csv              the paired differences, one row each
    seeds.json                    settings, every repeat's rows, the summary and the differences
                                  (an undefined number, such as the sd of one seed, is null)
    seeds.png                     forgetting per seed, one panel per modality before the last stage
                                  (and the mean when there are several)

A repeat whose ``experiment.json`` holds the same experiment is finished: with ``resume`` its table
is read back, not computed again; an unfinished repeat continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from invcoss.continual.experiment import (
    EXPERIMENT_THREADS,
    ExperimentEvent,
    ForgettingExperiment,
    run_forgetting_experiment,
)
from invcoss.continual.layout import STAGE_NAME, stage_dir
from invcoss.continual.paired import PairedDifference, mean_sd, paired_difference
from invcoss.continual.plot import Panel, line_plot
from invcoss.data.atomic import atomic_write_bytes, atomic_write_json

__all__ = ["MEAN", "PAIRS", "SeedsResult", "SeedsSummary", "aggregate", "run_seeds", "seed_experiment"]

PAIRS = (("invcoss", "seq"), ("invcoss", "er"), ("er", "seq"))
MEAN = "mean"
"""The ``modality`` of the mean over the modalities trained before the last stage."""


def seed_experiment(experiment: ForgettingExperiment, k: int) -> ForgettingExperiment:
    """Repeat ``k`` of ``experiment``: phantom seeds ``seed + 2k`` (training), ``+ 1`` (held-out), runs ``base.seed + k``.

    Example:
        >>> e = seed_experiment(ForgettingExperiment.from_size("tiny"), 2)
        >>> e.seed, e.base.seed
        (4, 2)
    """
    if k < 0:
        raise ValueError(f"seed index must be >= 0, got {k}")
    return dataclasses.replace(
        experiment, seed=experiment.seed + 2 * k, base=experiment.base.replace(seed=experiment.base.seed + k)
    )


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SeedsSummary:
    """What :func:`aggregate` returns.

    Attributes:
        columns: the numeric columns summarised.
        table: one dict per method and modality (then ``mean``): ``method``, ``modality``, ``n`` and
            ``<column>_mean`` / ``<column>_sd`` per column.
        differences: the paired differences.
    """

    columns: list[str]
    table: list[dict]
    differences: list[PairedDifference]


def aggregate(
    rows_by_seed: Sequence[Sequence[dict]],
    last: str,
    compare: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] = PAIRS,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> SeedsSummary:
    """Mean +- sd of every numeric column and paired differences between methods (module docstring).

    Args:
        rows_by_seed: per repeat, its :meth:`ForgettingResult.rows` (``method``, ``modality`` and
            any other columns).
        last: the modality of the last stage (left out of the ``mean`` rows).
        compare: columns of the paired differences (default: the numeric columns whose name
            contains ``forgetting``).
        pairs: ``(a, b)`` method pairs, each summarised as ``a - b`` where both were run.
        resamples, level, seed: of the bootstrap intervals.

    Raises:
        ValueError: no repeat, repeats with different methods or modalities, or a compared column
            that is not numeric in every row.

    Example:
        >>> rows = [[{"method": m, "modality": "ct", "forgetting": f + k} for m, f in (("seq", 0.2), ("er", 0.1))]
        ...         for k in (0.0, 0.1)]
        >>> s = aggregate(rows, last="xray")
        >>> s.table[0]["method"], round(s.table[0]["forgetting_mean"], 3), s.columns
        ('seq', 0.25, ['forgetting'])
        >>> d = s.differences[0]
        >>> (d.a, d.b, d.modality), round(d.mean, 3), d.n
        (('er', 'seq', 'ct'), -0.1, 2)
    """
    if not rows_by_seed:
        raise ValueError("aggregate needs the rows of at least one repeat")
    keys = [[(r["method"], r["modality"]) for r in rows] for rows in rows_by_seed]
    if any(set(k) != set(keys[0]) for k in keys):
        raise ValueError("the repeats do not share their methods and modalities; they are not comparable")
    all_rows = [r for rows in rows_by_seed for r in rows]
    columns = [c for c in all_rows[0] if c not in ("method", "modality")]
    columns = [c for c in columns if all(_numeric(r.get(c)) for r in all_rows)]
    compare = [c for c in columns if "forgetting" in c] if compare is None else list(compare)
    bad = [c for c in compare if c not in columns]
    if bad:
        raise ValueError(
            f"compare names column(s) {bad} that are not numeric in every row; numeric: {columns}"
        )

    # values[(method, modality)][column] = one value per repeat, in repeat order
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for rows in rows_by_seed:
        for r in rows:
            cell = values.setdefault((r["method"], r["modality"]), {c: [] for c in columns})
            for c in columns:
                cell[c].append(float(r[c]))
    methods = list(dict.fromkeys(m for m, _ in keys[0]))
    modalities = list(dict.fromkeys(mod for _, mod in keys[0]))
    earlier = [mod for mod in modalities if mod != last]
    if earlier:
        for method in methods:
            values[method, MEAN] = {
                c: [
                    sum(values[method, mod][c][k] for mod in earlier) / len(earlier)
                    for k in range(len(rows_by_seed))
                ]
                for c in columns
            }
        modalities.append(MEAN)

    table = []
    for method in methods:
        for modality in modalities:
            row: dict = {"method": method, "modality": modality, "n": len(rows_by_seed)}
            for c in columns:
                row[f"{c}_mean"], row[f"{c}_sd"] = mean_sd(values[method, modality][c])
            table.append(row)
    # The last stage's modality has forgotten nothing yet (0 by definition): no forgetting difference.
    differences = [
        paired_difference(
            a, b, modality, c, values[a, modality][c], values[b, modality][c], resamples, level, seed
        )
        for a, b in pairs
        if a in methods and b in methods
        for modality in modalities
        for c in compare
        if not (modality == last and "forgetting" in c)
        # A region a modality does not have (X-ray background) gives NaN in every repeat: no row.
        and not all(math.isnan(v) for v in values[a, modality][c] + values[b, modality][c])
    ]
    return SeedsSummary(columns, table, differences)


@dataclass
class SeedsResult:
    """The repeats of :func:`run_seeds` and their summary; :meth:`write` writes the report files."""

    out: Path
    experiment: ForgettingExperiment
    seeds: list[int]
    rows: list[list[dict]]
    stage1: list[dict]
    summary: SeedsSummary
    seconds: float

    def markdown(self) -> str:
        """The mean +- sd table and the paired differences as Markdown."""
        s = self.summary
        n = len(self.seeds)
        lines = [
            f"Mean +- sd over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, self.seeds))}); "
            f"`{MEAN}` is the mean over {', '.join(self.experiment.base.order[:-1]) or 'no modality'}.",
            "",
            "| method | modality | " + " | ".join(c.replace("_", " ") for c in s.columns) + " |",
            "|---|---|" + "---:|" * len(s.columns),
        ]
        for row in s.table:
            cells = [_pm(row[f"{c}_mean"], row[f"{c}_sd"], c) for c in s.columns]
            lines.append(f"| {row['method']} | {row['modality']} | " + " | ".join(cells) + " |")
        if s.differences:
            level = s.differences[0].level
            lines += [
                "",
                f"Paired differences over seeds (mean, sd, t, {level:.0%} bootstrap interval of the mean):",
                "",
                "| difference | modality | column | mean | sd | t | interval |",
                "|---|---|---|---:|---:|---:|---|",
            ]
            for d in s.differences:
                lines.append(
                    f"| {d.a} - {d.b} | {d.modality} | {d.column.replace('_', ' ')} | {d.mean:+.4f} | "
                    f"{d.sd:.4f} | {d.t:+.2f} | [{d.low:+.4f}, {d.high:+.4f}] |"
                )
        return "\n".join(lines) + "\n"

    def write(self) -> dict[str, Path]:
        """``seeds.csv``, ``seeds_paired.csv``, ``seeds.md``, ``seeds.json`` and ``seeds.png`` in ``out``."""
        s = self.summary
        paired = [
            {k: v for k, v in dataclasses.asdict(d).items() if k != "differences"} for d in s.differences
        ]
        panels = []
        if "forgetting" in s.columns:
            labels = [str(k) for k in self.seeds]
            earlier = list(self.experiment.base.order[:-1])
            for modality in earlier + [MEAN] * (len(earlier) > 1):
                series = {}
                for method in dict.fromkeys(r["method"] for r in s.table):
                    series[method] = [
                        _forgetting(rows, method, modality, self.experiment) for rows in self.rows
                    ]
                panels.append(Panel(f"{modality}: forgetting", labels, series, y_label="forgetting"))
        files = {
            "csv": atomic_write_bytes(self.out / "seeds.csv", _csv(s.table)),
            "paired_csv": atomic_write_bytes(self.out / "seeds_paired.csv", _csv(paired)),
            "md": atomic_write_bytes(self.out / "seeds.md", self.markdown().encode()),
            "json": atomic_write_json(
                self.out / "seeds.json",
                _json_safe(
                    {
                        "experiment": self.experiment.to_dict(),
                        "seeds": self.seeds,
                        "phantom_seeds": [seed_experiment(self.experiment, k).seed for k in self.seeds],
                        "rows": self.rows,
                        "stage1": self.stage1,
                        "columns": s.columns,
                        "summary": s.table,
                        "paired": [dataclasses.asdict(d) for d in s.differences],
                        "seconds": self.seconds,
                    }
                ),
            ),
        }
        if panels:
            files["png"] = line_plot(self.out / "seeds.png", panels, "forgetting per seed (x: seed)")
        return files


def _forgetting(rows: list[dict], method: str, modality: str, exp: ForgettingExperiment) -> float | None:
    if modality == MEAN:
        v = [r["forgetting"] for r in rows if r["method"] == method and r["modality"] != exp.base.order[-1]]
        return sum(v) / len(v) if v else None
    return next((r["forgetting"] for r in rows if r["method"] == method and r["modality"] == modality), None)


def _json_safe(value: object) -> object:
    """``value`` with NaN and infinities as None (null): JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _pm(mean: float, sd: float, column: str) -> str:
    if "bytes" in column:
        return f"{mean:.0f}"
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(sd) else f"{mean:.4f} +- {sd:.4f}"


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue().encode()


def _finished_rows(folder: Path, exp: ForgettingExperiment) -> list[dict] | None:
    """The rows of a repeat already finished in ``folder`` with the same experiment, else None."""
    try:
        saved = json.loads((folder / "experiment.json").read_text())
    except (OSError, ValueError):
        return None
    same = saved.get("experiment") == json.loads(json.dumps(exp.to_dict()))
    if not same or saved.get("rows") is None:
        return None
    # experiment.json writes NaN (a region without patches) as null: read it back as NaN, so a
    # resumed summary has the same columns as a fresh one.
    return [{k: math.nan if v is None else v for k, v in row.items()} for row in saved["rows"]]


def _stage1(folder: Path, exp: ForgettingExperiment, rows: list[dict]) -> dict:
    """The first stage's training curve (mean MAE per epoch) and its held-out loss at the end."""
    first = exp.base.order[0]
    method = exp.methods[0]
    try:
        stage = json.loads((stage_dir(folder / "runs" / method, 0, first) / STAGE_NAME).read_text())
        curve = [h["mae"] for h in stage["history"]]
    except (OSError, ValueError, KeyError):
        curve = []
    held_out = next((r["loss_after_own_stage"] for r in rows if r["modality"] == first), None)
    return {
        "modality": first,
        "epochs": exp.base.stage_epochs(0),
        "training_mae": curve,
        "held_out": held_out,
    }


def _run_repeat(
    folder: Path, exp: ForgettingExperiment, resume: bool, device: str | None, threads: int
) -> list[dict]:
    """One repeat in a worker process (``run_seeds(jobs > 1)``): its table's rows."""
    return run_forgetting_experiment(folder, exp, resume=resume, device=device, threads=threads).rows()


def run_seeds(
    out: str | os.PathLike,
    experiment: ForgettingExperiment | None = None,
    seeds: int = 3,
    resume: bool = False,
    device: str | None = None,
    on_event: Callable[[int, ExperimentEvent], None] | None = None,
    resamples: int = 10_000,
    level: float = 0.95,
    threads: int = EXPERIMENT_THREADS,
    jobs: int = 1,
) -> SeedsResult:
    """Run ``seeds`` repeats of the forgetting experiment in ``out/seed-<k>`` and summarise them.

    Args:
        out: the folder of the repeats and the report (module docstring).
        experiment: default ``ForgettingExperiment.from_size("quick")``; repeat ``k`` runs
            :func:`seed_experiment` of it.
        seeds: number of repeats ``K`` (>= 1); repeats ``0 .. K-1``.
        resume: keep finished repeats and continue unfinished ones.
        device: default: CUDA when available, else CPU.
        on_event: receives ``(k, event)`` for every event of repeat ``k``, and before each repeat an
            :class:`ExperimentEvent` of phase ``seed`` with ``info`` ``{"seed": k, "seeds": K,
            "kept": bool}`` (``kept``: finished earlier, read back).
        resamples, level: of the bootstrap intervals (seeded with the experiment's ``seed``).
        threads: CPU threads of every repeat (see :func:`run_forgetting_experiment`).
        jobs: repeats run at once, each in its own process (``jobs * threads`` CPU threads in
            all). The numbers do not depend on it: a repeat is a function of its settings and its
            thread count. With ``jobs > 1`` the events of a repeat are not forwarded (only its
            ``seed`` event, when it starts) and ``device`` must not be CUDA.

    Raises:
        ValueError: ``seeds < 1``; ``out`` already holds repeats and ``resume`` is not set; a
            repeat made with another configuration.
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and device is not None and str(device).startswith("cuda"):
        raise ValueError("jobs > 1 runs repeats in CPU processes; use jobs=1 with a CUDA device")
    exp = experiment or ForgettingExperiment.from_size("quick")
    out = Path(out)
    t0 = time.perf_counter()
    ks = list(range(seeds))
    if not resume:
        existing = [f"seed-{k}" for k in ks if (out / f"seed-{k}" / "runs").exists()]
        if existing:
            raise ValueError(
                f"{out} already holds repeats {', '.join(existing)}; pass resume=True (--resume)"
            )
    repeats = {k: (seed_experiment(exp, k), out / f"seed-{k}") for k in ks}
    rows_of = {k: _finished_rows(folder, exp_k) if resume else None for k, (exp_k, folder) in repeats.items()}

    def started(k: int) -> None:
        if on_event is not None:
            info = {"seed": k, "seeds": seeds, "kept": rows_of[k] is not None}
            on_event(k, ExperimentEvent("seed", None, info))

    todo = [k for k in ks if rows_of[k] is None]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        for k in ks:
            if rows_of[k] is not None:
                started(k)
        # spawn: a fresh interpreter per worker, so no thread pool or lock of this process is inherited.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
            futures = {}
            for k in todo:
                started(k)
                exp_k, folder = repeats[k]
                futures[k] = pool.submit(_run_repeat, folder, exp_k, resume, device, threads)
            for k, future in futures.items():
                rows_of[k] = future.result()
    else:
        for k in ks:
            started(k)
            if rows_of[k] is None:
                exp_k, folder = repeats[k]
                rows_of[k] = run_forgetting_experiment(
                    folder,
                    exp_k,
                    resume=resume,
                    device=device,
                    on_event=None if on_event is None else (lambda e, k=k: on_event(k, e)),
                    threads=threads,
                ).rows()
    rows_by_seed = [rows_of[k] for k in ks]
    stage1 = [_stage1(repeats[k][1], repeats[k][0], rows_of[k]) for k in ks]
    summary = aggregate(rows_by_seed, exp.base.order[-1], resamples=resamples, level=level, seed=exp.seed)
    result = SeedsResult(out, exp, ks, rows_by_seed, stage1, summary, time.perf_counter() - t0)
    result.write()
    return result
