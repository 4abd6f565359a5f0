"""Line plots as PNG with Pillow only: the knowledge-retention curves of Fig. 6b, loss curves.

matplotlib is not a dependency; :func:`line_plot` draws panels side by side, each with axes, y
ticks at round values, one polyline with markers per series (a missing value breaks the line; no
markers beyond 40 points) and a legend. An empty x label leaves its point without a tick.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from invcoss.data.atomic import atomic_write_bytes

__all__ = ["Panel", "line_plot", "nice_ticks"]

_MARKERS_UP_TO = 40  # points per series drawn with markers; a longer curve is a plain line
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


@dataclass
class Panel:
    """One plot: ``series`` maps a name to one value (or None) per entry of ``x_labels``."""

    title: str
    x_labels: list[str]
    series: dict[str, list[float | None]] = field(default_factory=dict)
    y_label: str = "loss"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``.

    Example:
        >>> nice_ticks(0.42, 0.97)
        [0.4, 0.6, 0.8, 1.0]
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _label(v: float) -> str:
    return f"{v:.4g}"


def line_plot(
    path: str | os.PathLike,
    panels: Sequence[Panel],
    title: str = "",
    panel_size: tuple[int, int] = (420, 320),
) -> Path:
    """Draw ``panels`` side by side into a PNG at ``path`` (written atomically).

    Raises:
        ValueError: no panel, or a series whose length differs from its panel's x labels.

    Example:
        >>> import tempfile, pathlib
        >>> p = line_plot(pathlib.Path(tempfile.mkdtemp()) / "r.png",
        ...               [Panel("ct", ["1 ct", "2 mri"], {"seq": [0.5, 0.9], "er": [0.5, 0.6]})])
        >>> from PIL import Image; Image.open(p).size
        (420, 344)
    """
    from PIL import Image, ImageDraw, ImageFont

    if not panels:
        raise ValueError("line_plot needs at least one panel")
    for p in panels:
        for name, values in p.series.items():
            if len(values) != len(p.x_labels):
                raise ValueError(
                    f"series {name!r} of panel {p.title!r} has {len(values)} values for {len(p.x_labels)} x labels"
                )
    pw, ph = panel_size
    top = 24
    img = Image.new("RGB", (pw * len(panels), ph + top), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    for k, panel in enumerate(panels):
        _draw_panel(draw, font, panel, k * pw, top, pw, ph)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _draw_panel(draw, font, panel: Panel, x0: int, y0: int, w: int, h: int) -> None:
    left, right, top, bottom = x0 + 58, x0 + w - 14, y0 + 26, y0 + h - 40
    draw.text((x0 + 58, y0 + 6), panel.title, fill="black", font=font)
    values = [v for s in panel.series.values() for v in s if v is not None and math.isfinite(v)]
    ticks = nice_ticks(min(values), max(values)) if values else [0.0, 1.0]
    lo, hi = ticks[0], ticks[-1]
    n = len(panel.x_labels)

    def px(i: int) -> float:
        return left + (right - left) * (0.5 if n == 1 else i / (n - 1))

    def py(v: float) -> float:
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    for t in ticks:
        y = py(t)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((x0 + 4, y - 6), _label(t), fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for i, label in enumerate(panel.x_labels):
        if not label:  # a long curve labels a few of its points
            continue
        draw.line([(px(i), bottom), (px(i), bottom + 4)], fill="black")
        draw.text((px(i) - 3 * len(label), bottom + 8), label, fill="black", font=font)
    draw.text((x0 + 4, top - 18), panel.y_label, fill=(90, 90, 90), font=font)
    for j, (name, series) in enumerate(panel.series.items()):
        colour = _COLOURS[j % len(_COLOURS)]
        points: list[tuple[float, float] | None] = [
            (px(i), py(v)) if v is not None and math.isfinite(v) else None for i, v in enumerate(series)
        ]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                draw.line([a, b], fill=colour, width=2)
        for p in points if n <= _MARKERS_UP_TO else ():
            if p is not None:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        ly = top + 4 + 14 * j
        draw.line([(right - 90, ly + 6), (right - 72, ly + 6)], fill=colour, width=2)
        draw.text((right - 68, ly), name, fill="black", font=font)
