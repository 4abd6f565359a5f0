"""The paper's preprocessing (Appendix A.1) as small composable callables.

Two kinds of transform:

- array → array on one image: :class:`Resample` (on a :class:`~invcoss.data.readers.Volume`),
  :class:`FillNonFinite`, :class:`IntensityWindow`, :class:`ZScore`, :class:`Resize`, :class:`ToGrey`,
  :class:`ReplicateChannels`, :class:`Clip`; chain them with :class:`Compose`.
- one image → several crops: :class:`SlidingWindows` (axial windows of a volume) and
  :class:`GridPatches` (contiguous patches of a large 2D tile). Their ``positions(n)`` gives the
  start offsets without touching the data, so a dataset can count samples from a header.

Arrays are numpy float32: volumes ``(D, H, W)``, 2D images ``(C, H, W)``; resizing runs through
``torch.nn.functional.interpolate`` on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from invcoss.data.readers import Volume


class Compose:
    """Apply callables in order: ``Compose([f, g])(x) == g(f(x))``.

    Example:
        >>> t = Compose([IntensityWindow(-1024, 1024), Clip(-0.5, 0.5)])
        >>> t(np.array([-2000.0, 0.0, 512.0], dtype=np.float32)).tolist()
        [-0.5, 0.0, 0.5]
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """Voxel counts after resampling: ``round(n * spacing / target)``, at least 1 per axis."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


@dataclass(frozen=True)
class Resample:
    """Resample a :class:`Volume` to (about) ``target`` mm spacing, keeping its physical extent.

    The new shape is ``round(n * spacing / target)`` per axis and the new spacing is
    ``extent / new_shape``, so the extent (voxels times spacing) is preserved exactly and the
    spacing is ``target`` to within half a voxel over the whole extent. Trilinear interpolation
    with ``align_corners=False`` maps the outer voxel edges onto each other, which is the same
    statement in sampling terms.

    Example:
        >>> v = Volume(np.zeros((10, 4, 4), np.float32), (2.5, 0.5, 0.5), np.eye(4))
        >>> r = Resample((1.0, 1.0, 1.0))(v)
        >>> r.array.shape, r.spacing, r.extent == v.extent
        ((25, 2, 2), (1.0, 1.0, 1.0), True)
    """

    target: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __call__(self, volume: Volume) -> Volume:
        shape = resampled_shape(volume.array.shape, volume.spacing, self.target)
        if shape == volume.array.shape:
            return volume
        array = resize_array(volume.array[None], shape)[0]
        spacing = tuple(n * s / m for n, s, m in zip(volume.array.shape, volume.spacing, shape))
        return replace(volume, array=array, spacing=spacing)


@dataclass(frozen=True)
class IntensityWindow:
    """Map ``[a_min, a_max]`` linearly onto ``[b_min, b_max]``, clipping outside when ``clip``.

    The CT default maps Hounsfield units -1024 → -1 and 1024 → 1 (Appendix A.1).

    Example:
        >>> IntensityWindow()(np.array([-3000.0, -1024.0, 0.0, 1024.0, 3000.0])).tolist()
        [-1.0, -1.0, 0.0, 1.0, 1.0]
    """

    a_min: float = -1024.0
    a_max: float = 1024.0
    b_min: float = -1.0
    b_max: float = 1.0
    clip: bool = True

    def __post_init__(self) -> None:
        if not self.a_max > self.a_min:
            raise ValueError(
                f"IntensityWindow expects a_max > a_min, got a_min={self.a_min}, a_max={self.a_max}"
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        scale = (self.b_max - self.b_min) / (self.a_max - self.a_min)
        y = (np.asarray(x, dtype=np.float32) - self.a_min) * scale + self.b_min
        if self.clip:
            y = np.clip(y, min(self.b_min, self.b_max), max(self.b_min, self.b_max))
        return y.astype(np.float32, copy=False)


@dataclass(frozen=True)
class ZScore:
    """Subtract the mean and divide by the standard deviation of the whole array (per volume).

    A constant array becomes zeros rather than NaN.

    Example:
        >>> ZScore()(np.array([1.0, 3.0])).tolist()
        [-1.0, 1.0]
    """

    eps: float = 1e-8

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x64 = np.asarray(x, dtype=np.float64)
        std = x64.std()
        return ((x64 - x64.mean()) / max(std, self.eps)).astype(np.float32)


@dataclass(frozen=True)
class FillNonFinite:
    """Replace NaN and -inf by the smallest finite value, +inf by the largest (background stays background).

    An array without any finite value becomes zeros; callers that must reject it check first.

    Example:
        >>> FillNonFinite()(np.array([np.nan, 1.0, np.inf, -np.inf, 3.0])).tolist()
        [1.0, 1.0, 3.0, 1.0, 3.0]
    """

    def __call__(self, x: np.ndarray) -> np.ndarray:
        finite = np.isfinite(x)
        if finite.all():
            return x
        if not finite.any():
            return np.zeros_like(x, dtype=np.float32)
        lo, hi = float(x[finite].min()), float(x[finite].max())
        return np.nan_to_num(x, nan=lo, posinf=hi, neginf=lo).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Clip:
    """Clip values to ``[lo, hi]``."""

    lo: float
    hi: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lo, self.hi).astype(np.float32, copy=False)


def resize_array(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize the spatial axes of a channel-first array ``(C, *S)`` to ``size`` (2 or 3 axes).

    2D uses bilinear interpolation with antialiasing (so 512 → 224 does not alias), 3D trilinear,
    both with ``align_corners=False`` (pixel edges map onto pixel edges).

    Antialiased 2D resizing runs one pass per axis, widths first, through a ``(C, H, new W)``
    intermediate; an image narrower and taller than ``size`` (6x65535 to 224x224) would make that
    intermediate far larger than input and output (here 176 MB), so its heights are resized first.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return np.ascontiguousarray(x, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    if len(size) == 2:
        if size[1] > t.shape[3] and size[0] < t.shape[2]:  # heights first: the pass keeps the width
            t = F.interpolate(
                t, size=(size[0], t.shape[3]), mode="bilinear", align_corners=False, antialias=True
            )
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    return out[0].numpy()


@dataclass(frozen=True)
class Resize:
    """Resize a ``(D, H, W)`` volume (``len(size) == 3``) or a ``(C, H, W)`` image (``len(size) == 2``).

    Example:
        >>> Resize((16, 8, 8))(np.zeros((24, 20, 20), np.float32)).shape
        (16, 8, 8)
        >>> Resize((4, 4))(np.zeros((3, 9, 9), np.float32)).shape
        (3, 4, 4)
    """

    size: tuple[int, ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(self.size) == 3:
            return resize_array(x[None], self.size)[0]
        return resize_array(x, self.size)


@dataclass(frozen=True)
class ToGrey:
    """``(C, H, W)`` → ``(1, H, W)``: the channel mean (a no-op for one channel)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x if x.shape[0] == 1 else x.mean(axis=0, keepdims=True, dtype=np.float32)


@dataclass(frozen=True)
class ReplicateChannels:
    """``(1, H, W)`` → ``(channels, H, W)`` by copying the grey channel (X-ray into an RGB model).

    Example:
        >>> ReplicateChannels(3)(np.zeros((1, 2, 2), np.float32)).shape
        (3, 2, 2)
    """

    channels: int = 3

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == self.channels:
            return x
        if x.shape[0] != 1:
            raise ValueError(f"ReplicateChannels expects 1 or {self.channels} channels, got {x.shape[0]}")
        return np.ascontiguousarray(np.repeat(x, self.channels, axis=0))


def window_starts(n: int, size: int, stride: int, cover_end: bool = False) -> list[int]:
    """Start offsets of windows of ``size`` every ``stride`` along an axis of length ``n``.

    Windows lie fully inside: ``0, stride, 2*stride, ...`` while ``start + size <= n``. With
    ``cover_end`` one more window flush with the end is added when the regular ones leave slices
    uncovered. An axis shorter than ``size`` gives the single start 0 (the crop is padded).

    Example:
        >>> window_starts(100, 24, 12)
        [0, 12, 24, 36, 48, 60, 72]
        >>> window_starts(100, 24, 12, cover_end=True)[-1]
        76
    """
    if size < 1 or stride < 1:
        raise ValueError(f"window_starts expects size >= 1 and stride >= 1, got size={size}, stride={stride}")
    if n <= size:
        return [0]
    starts = list(range(0, n - size + 1, stride))
    if cover_end and starts[-1] + size < n:
        starts.append(n - size)
    return starts


@dataclass(frozen=True)
class SlidingWindows:
    """Split a ``(D, H, W)`` volume into windows of ``size`` slices every ``stride`` along D.

    A volume with fewer than ``size`` slices gives one window padded at the superior end with the
    volume's minimum (air for CT), so every window has exactly ``size`` slices.

    Example:
        >>> wins = SlidingWindows(24, 12)(np.zeros((100, 2, 2), np.float32))
        >>> len(wins), wins[0].shape
        (7, (24, 2, 2))
    """

    size: int = 24
    stride: int = 12
    cover_end: bool = False

    def positions(self, depth: int) -> list[int]:
        return window_starts(depth, self.size, self.stride, self.cover_end)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        out = []
        for s in self.positions(x.shape[0]):
            w = x[s : s + self.size]
            if w.shape[0] < self.size:
                pad = np.full((self.size - w.shape[0], *w.shape[1:]), x.min(), dtype=np.float32)
                w = np.concatenate([w, pad], axis=0)
            out.append(np.ascontiguousarray(w, dtype=np.float32))
        return out


@dataclass(frozen=True)
class GridPatches:
    """Contiguous non-overlapping ``size x size`` patches of a ``(C, H, W)`` tile, row by row.

    Patches lie fully inside the tile; an axis shorter than ``size`` is taken whole (one patch
    along it). ``positions(h, w)`` gives the ``(top, left)`` corners.

    Example:
        >>> GridPatches(512).positions(1100, 600)
        [(0, 0), (512, 0)]
    """

    size: int = 512

    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        rows = window_starts(height, self.size, self.size)
        cols = window_starts(width, self.size, self.size)
        return [(r, c) for r in rows for c in cols]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return [
            np.ascontiguousarray(x[:, r : r + self.size, c : c + self.size])
            for r, c in self.positions(x.shape[1], x.shape[2])
        ]
