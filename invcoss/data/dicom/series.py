"""DICOM series: grouping files by SeriesInstanceUID, sorting and checking slices, reading a volume.

See :mod:`invcoss.data.dicom` for what is read and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from invcoss.data.dicom.headers import DicomSlice, _pixels, _read_header, _slices_of
from invcoss.data.limits import OVER_LIMIT, UNUSABLE, ReadError, ReadLimits
from invcoss.data.readers import Volume, VolumeHeader, canonical_geometry, canonical_volume

# Slice steps further than this fraction from the median are uneven (resampled with a warning).
UNEVEN_TOLERANCE = 0.01

# A step over this many times the median is a gap: slices are missing and the series is skipped.
GAP_FACTOR = 1.5

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomSeries:
    """The slices of one ``SeriesInstanceUID`` in slice order, with their geometry from the headers.

    ``affine`` maps ``(column, row, slice)`` indices to RAS+ mm; ``header`` is the canonical shape
    and spacing :func:`read_dicom_series` will return; ``warnings`` are for a person.
    """

    uid: str
    label: Path
    slices: list[DicomSlice]
    rows: int
    cols: int
    affine: np.ndarray
    header: VolumeHeader
    step: float
    warnings: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """The distinct files of the series."""
        return sorted({s.path for s in self.slices})


@dataclass
class DicomImage:
    """A single 2D DICOM image (CR, DX, or any one-frame image) read as a picture."""

    path: Path
    uid: str
    rows: int
    cols: int


@dataclass
class DicomScan:
    """What :func:`scan_dicom` found: volumes (series), single images, and the files it skipped."""

    series: list[DicomSeries] = field(default_factory=list)
    images: list[DicomImage] = field(default_factory=list)
    skipped: list[ReadError] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)


def _build_series(uid: str, label: Path, parts: list, limits: ReadLimits) -> DicomSeries:
    """Sort, check and place the slices of one series (headers only)."""
    (first_path, ds0, rows, cols, _) = parts[0]
    slices: list[tuple[np.ndarray, DicomSlice]] = []
    iop0 = spacing0 = None
    for path, ds, r, c, frames in parts:
        if (r, c) != (rows, cols):
            raise ReadError(
                label,
                f"slices of {rows}x{cols} and {r}x{c} pixels in one series ({first_path.name}, {path.name})",
            )
        found, iop, spacing = _slices_of(path, ds, frames)
        if iop0 is None:
            iop0, spacing0 = iop, spacing
        elif not (np.allclose(iop, iop0, atol=1e-4) and np.allclose(spacing, spacing0, rtol=1e-4)):
            raise ReadError(
                label,
                f"slices of different orientation or pixel spacing in one series ({first_path.name}, {path.name})",
            )
        slices.extend(found)
    warnings = []
    seen: set[str] = set()
    unique = []
    for pos, s in slices:
        if s.instance not in seen:
            seen.add(s.instance)
            unique.append((pos, s))
    if len(unique) < len(slices):
        warnings.append(
            f"{len(slices) - len(unique)} duplicate cop(ies) of the same slice (SOPInstanceUID) dropped"
        )
    unique.sort(key=lambda ps: ps[1].position)
    positions = np.array([s.position for _, s in unique])
    steps = np.diff(positions)
    if len(steps) and steps.min() < 1e-3:
        k = int(np.sum(steps < 1e-3))
        raise ReadError(
            label,
            f"{k} pair(s) of different slices at the same position (several phases, echoes or acquisitions in one "
            "series?): pick the images of one acquisition",
        )
    if len(steps):
        step = float(np.median(steps))
        if steps.max() > GAP_FACTOR * step:
            i = int(np.argmax(steps))
            raise ReadError(
                label,
                f"missing slice(s): a gap of {steps[i]:.3g} mm between slices at {positions[i]:.3g} and "
                f"{positions[i + 1]:.3g} mm where the usual step is {step:.3g} mm",
            )
        if np.abs(steps - step).max() > UNEVEN_TOLERANCE * step:
            warnings.append(
                f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm): resampled to a regular "
                f"{step:.3g} mm grid by linear interpolation"
            )
    else:
        step = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
    count = int(round((positions[-1] - positions[0]) / step)) + 1 if len(steps) else 1
    voxels = rows * cols * max(count, len(unique))  # also after resampling uneven steps
    if voxels > limits.max_voxels:
        raise ReadError(
            label,
            f"{max(count, len(unique))}x{rows}x{cols} = {voxels:,} voxels, more than the limit of {limits.max_voxels:,} "
            "(raise it with --max-voxels / ReadLimits.max_voxels)",
            OVER_LIMIT,
        )
    spacing_xyz = (float(spacing0[1]), float(spacing0[0]), step)
    bad = [s for s in spacing_xyz if not limits.min_spacing <= s <= limits.max_spacing]
    if bad:
        raise ReadError(
            label,
            f"voxel spacing {tuple(round(s, 6) for s in spacing_xyz)} mm is outside [{limits.min_spacing}, "
            f"{limits.max_spacing}] mm (raise the range with --min-spacing / --max-spacing)",
            OVER_LIMIT,
        )
    normal = np.cross(iop0[:3], iop0[3:])
    lps = np.eye(4)
    # DICOM: column index moves along the row direction (iop[:3]) by the column spacing (PixelSpacing[1]).
    lps[:3, 0] = iop0[:3] * spacing0[1]
    lps[:3, 1] = iop0[3:] * spacing0[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = unique[0][0]
    affine = _LPS_TO_RAS @ lps
    shape, zooms = canonical_geometry((cols, rows, count), affine)
    header = VolumeHeader(shape, zooms, 1, 3)
    return DicomSeries(uid, label, [s for _, s in unique], rows, cols, affine, header, step, warnings)


def scan_dicom(paths: list[Path], limits: ReadLimits, ndim: int, series: str | None = None) -> DicomScan:
    """Read the headers of DICOM files and group them into series (volumes) or images (2D).

    Args:
        paths: the DICOM files.
        limits: checked from every header.
        ndim: 3 groups files into volumes by series, 2 makes every single image a picture.
        series: keep only this ``SeriesInstanceUID`` (None: every series).

    Returns:
        :class:`DicomScan`; a file or series that cannot be used is a :class:`ReadError` in ``skipped``.
    """
    scan = DicomScan()
    groups: dict[str, list] = {}
    for path in paths:
        try:
            ds, rows, cols, frames = _read_header(path, limits)
        except ReadError as e:
            scan.skipped.append(e)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"no-series-uid:{path.name}")
        scan.uids.add(uid)
        if series is not None and uid != series:
            continue
        if ndim == 2:
            if frames > 1:
                scan.skipped.append(
                    ReadError(path, f"{frames} frames: the 2D modalities read single images", UNUSABLE)
                )
            else:
                scan.images.append(DicomImage(path, uid, rows, cols))
            continue
        key = f"{uid}\0{path}" if frames > 1 else uid  # a multi-frame file is a series of its own
        groups.setdefault(key, []).append((path, ds, rows, cols, frames))
    for key, parts in groups.items():
        uid = key.split("\0")[0]
        parts.sort(key=lambda p: str(p[0]))
        parent = Path(os.path.commonpath([str(p[0].parent) for p in parts]))
        name = f"series {uid}" if "\0" not in key else f"{parts[0][0].name} series {uid}"
        label = parent / name
        try:
            scan.series.append(_build_series(uid, label, parts, limits))
        except ReadError as e:
            scan.skipped.append(e)
        except Exception as e:
            scan.skipped.append(ReadError(label, f"cannot place its slices ({type(e).__name__}: {e})"))
    return scan


def read_dicom_series(series: DicomSeries, limits: ReadLimits) -> Volume:
    """The voxels of a series from :func:`scan_dicom`, as :func:`~invcoss.data.read_nifti` gives a volume.

    Raises:
        ReadError: a file's pixel data cannot be decoded or is not ``rows x cols`` of one channel.
    """
    stack = np.empty((len(series.slices), series.rows, series.cols), dtype=np.float32)
    loaded: dict[Path, tuple[int, np.ndarray]] = {}
    for k, s in enumerate(series.slices):
        if s.path not in loaded:
            loaded.clear()  # keep one file's pixels at a time (a multi-frame file is read once)
            ds, arr = _pixels(s.path, limits)
            loaded[s.path] = (int(ds.get("NumberOfFrames", 1) or 1), arr)
        frames, arr = loaded[s.path]
        frame = arr[s.frame] if frames > 1 and arr.ndim == 3 and s.frame < len(arr) else arr
        if frame.shape != (series.rows, series.cols):
            raise ReadError(
                s.path, f"pixel data of shape {frame.shape}, expected {series.rows}x{series.cols} grey"
            )
        stack[k] = frame.astype(np.float32) * s.slope + s.intercept
    positions = np.array([s.position for s in series.slices])
    n = int(round((positions[-1] - positions[0]) / series.step)) + 1 if len(positions) > 1 else 1
    if (
        n != len(positions)
        or np.abs(np.diff(positions) - series.step).max(initial=0) > UNEVEN_TOLERANCE * series.step
    ):
        target = positions[0] + series.step * np.arange(n)
        stack = _interpolate(stack, positions, target)
    data = stack.transpose(2, 1, 0)  # (slice, row, col) -> (col, row, slice): the affine's index order
    return canonical_volume(data, series.affine, series.label)


def _interpolate(stack: np.ndarray, positions: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Linear interpolation of slices at ``positions`` onto ``target`` positions (both ascending)."""
    hi = np.clip(np.searchsorted(positions, target, side="right"), 1, len(positions) - 1)
    lo = hi - 1
    w = ((target - positions[lo]) / (positions[hi] - positions[lo])).clip(0, 1).astype(np.float32)
    return stack[lo] * (1 - w)[:, None, None] + stack[hi] * w[:, None, None]
