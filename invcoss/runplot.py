"""Loss curves of a run from its ``metrics.jsonl`` (:mod:`invcoss.runlog`), as PNG.

One picture per phase and stage: ``loss.png`` for the training steps of ``pretrain``,
``inversion.png`` for the steps of ``invert``; a continual run (or an experiment) gets
``loss_stage<k>_<modality>.png`` and ``inversion_stage<k>_<modality>.png``. Each picture has one
panel per loss and one line per method (and seed) of the run. Long curves are averaged over
equal runs of steps down to at most :data:`MAX_POINTS` points, so a 100k-step run still draws a
readable line. Drawn with Pillow by :func:`invcoss.continual.plot.line_plot` (no matplotlib).

Example:
    >>> import tempfile, pathlib
    >>> from invcoss.runlog import MetricsLog
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> with MetricsLog(run) as log:
    ...     for i in range(1, 5):
    ...         _ = log.write("step", step=i, phase="train", losses={"mae": 1.0 / i})
    >>> [p.name for p in plot_losses(read_metrics(run), run / "plots")]
    ['loss.png']
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from invcoss.continual.plot import Panel, line_plot
from invcoss.runlog import read_metrics

__all__ = ["MAX_POINTS", "loss_curves", "plot_losses", "read_metrics"]

MAX_POINTS = 200
_NAMES = {"train": "loss", "invert": "inversion"}


def _bin(points: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    """``points`` sorted by step, averaged over equal runs so that at most ``n`` remain."""
    points = sorted(points)
    if len(points) <= n:
        return points
    size = -(-len(points) // n)
    out = []
    for i in range(0, len(points), size):
        chunk = points[i : i + size]
        out.append((chunk[-1][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def loss_curves(records: list[dict]) -> dict[str, dict[str, dict[str, list[tuple[int, float]]]]]:
    """``{picture: {loss: {series: [(step, value), ...]}}}`` from the ``step`` lines of a run log.

    A picture is a phase (and a stage with its modality); a series is the line's method and seed,
    or ``"run"``. A step logged twice (a resumed run redoing an epoch) keeps its last value.
    """
    curves: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        if r.get("event") != "step" or r.get("step") is None:
            continue
        picture = _NAMES.get(r.get("phase", "train"), str(r.get("phase")))
        if r.get("stage") is not None:
            picture += f"_stage{r['stage']}_{r.get('modality', '')}"
        series = " ".join(
            str(r[k]) if k == "method" else f"seed {r[k]}" for k in ("method", "seed") if k in r
        )
        for name, value in (r.get("losses") or {}).items():
            if value is not None:
                curves[picture][name][series or "run"][r["step"]] = value
    return {
        pic: {
            name: {s: sorted(v.items()) for s, v in by_series.items()} for name, by_series in losses.items()
        }
        for pic, losses in curves.items()
    }


def _interpolate(points: list[tuple[int, float]], grid: list[int]) -> list[float | None]:
    """``points`` (sorted by step) read at every step of ``grid``: linear between its points, None
    outside its range (the series of methods with other step counts share one axis)."""
    out: list[float | None] = []
    j = 0
    for x in grid:
        if x < points[0][0] or x > points[-1][0]:
            out.append(None)
            continue
        while j + 1 < len(points) and points[j + 1][0] < x:
            j += 1
        (x0, y0), (x1, y1) = points[j], points[min(j + 1, len(points) - 1)]
        out.append(y0 if x1 == x0 or x <= x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return out


def _panel(name: str, by_series: dict[str, list[tuple[int, float]]]) -> Panel:
    binned = {s: _bin(points, MAX_POINTS) for s, points in by_series.items()}
    grid = sorted({step for points in binned.values() for step, _ in points})
    if len(grid) > MAX_POINTS:
        lo, hi = grid[0], grid[-1]
        grid = sorted({round(lo + (hi - lo) * i / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
    every = max(1, len(grid) // 5)
    labels = [str(s) if i % every == 0 or i == len(grid) - 1 else "" for i, s in enumerate(grid)]
    series = {s: _interpolate(points, grid) for s, points in binned.items()}
    return Panel(f"{name} by step", labels, series, y_label="")


def plot_losses(records: list[dict], out: str | os.PathLike, title: str = "") -> list[Path]:
    """Draw the loss curves of ``records`` (a run log's lines) into folder ``out``; returns the PNGs.

    Raises:
        ValueError: no ``step`` line with a loss.
    """
    curves = loss_curves(records)
    if not curves:
        raise ValueError("the run log has no step with a loss to plot")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for picture, losses in curves.items():
        panels = [_panel(name, by_series) for name, by_series in losses.items()]
        label = f"{title}: {picture}" if title else picture
        paths.append(line_plot(out / f"{picture}.png", panels, label))
    return paths
