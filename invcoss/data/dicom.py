"""DICOM input: series of slices (CT, MR) as volumes, single projection images (CR, DX) as pictures.

Needs the optional extra ``invcoss[dicom]`` (pydicom); without it a DICOM file is a
:class:`~invcoss.data.ReadError` of kind ``DICOM (pydicom not installed)`` whose reason names the extra.

What is read (docs/data.md, "DICOM"):

- :func:`scan_dicom` reads the headers only (no pixel data) and groups the files into series by
  ``SeriesInstanceUID``. Files without pixel data or of a non-image kind (SR, RT structure set,
  RT plan, presentation state, key object, segmentation) are skipped as ``non-image DICOM``.
- A series is one volume. Its slices are sorted by ``ImagePositionPatient`` projected on the slice
  normal (the cross product of the two ``ImageOrientationPatient`` directions), never by file name
  or ``InstanceNumber``. A multi-frame file is a series of its own (enhanced CT/MR: per-frame
  ``PlanePositionSequence``; otherwise ``ImagePositionPatient`` plus ``SpacingBetweenSlices``).
- Geometry: in-plane spacing from ``PixelSpacing`` (row, column), slice spacing from the sorted
  positions. The LPS patient coordinates of DICOM become the RAS+ canonical array and affine of
  :func:`~invcoss.data.read_nifti` (``(D, H, W)``: inferior → superior, posterior → anterior,
  left → right), so a series and the same volume as NIfTI read identically.
- Values: ``RescaleSlope`` / ``RescaleIntercept`` of every slice (frame) applied: CT in HU.
- Series problems: a copy of the same instance (same ``SOPInstanceUID``) is dropped with a
  warning; two different slices at one position (several phases or echoes in one series) or a gap
  of more than 1.5 times the usual slice step (missing slices) skip the series with the reason;
  steps that differ by more than 1 % (but no gap) are resampled by linear interpolation onto a
  regular grid at the median step, with a warning.
- :class:`~invcoss.data.ReadLimits` (voxels, pixels, spacing) are checked from the headers before
  any pixel is decoded, and so is the decoder: a compressed transfer syntax whose decoder is not
  installed is skipped with the packages that would decode it.
- 2D (X-ray): each image file is one picture. The modality LUT (rescale) is applied, then the VOI
  window (``WindowCenter`` / ``WindowWidth``, the first if several, DICOM's linear function) or
  the VOI LUT, giving [0, 1]; without either the image's own minimum and maximum span [0, 1].
  ``MONOCHROME1`` (white is low) is inverted so that bone is bright as in ``MONOCHROME2``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from invcoss.data.limits import DICOM, NON_IMAGE_DICOM, OVER_LIMIT, UNUSABLE, ReadError, ReadLimits

# _SizedReader: pydicom reads element values of the length the file states; the clamp keeps a
# corrupt length of 4 GB from allocating 4 GB (the same guard as the Pillow path's).
from invcoss.data.readers import (
    Picture,
    Volume,
    VolumeHeader,
    _SizedReader,
    canonical_geometry,
    canonical_volume,
)

INSTALL_HINT = "pip install invcoss[dicom]"
# Modalities whose files hold no image to learn from (a segmentation is a label map, not a scan).
NON_IMAGE_MODALITIES = ("SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "SEG", "REG", "DOC")
# Slice steps further than this fraction from the median are uneven (resampled with a warning).
UNEVEN_TOLERANCE = 0.01
# A step over this many times the median is a gap: slices are missing and the series is skipped.
GAP_FACTOR = 1.5
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pydicom(path: Path):
    try:
        import pydicom
    except ImportError:
        raise ReadError(path, f"a DICOM file: reading DICOM needs pydicom ({INSTALL_HINT})", DICOM) from None
    return pydicom


@dataclass(frozen=True)
class DicomSlice:
    """One slice of a series: ``frame`` of the file ``path`` (0 unless multi-frame), its position
    along the slice normal in mm and its rescale."""

    path: Path
    frame: int
    position: float
    slope: float
    intercept: float
    instance: str


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


def _floats(value, n: int, path: Path, name: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ReadError(path, f"{name} {value!r} is not {n} numbers") from e
    if out.shape != (n,) or not np.isfinite(out).all():
        raise ReadError(path, f"{name} {list(value)!r} is not {n} finite numbers")
    return out


def _group_attr(ds, frame: int, sequence: str, name: str):
    """An attribute of a functional group (per-frame first, then shared), else of the dataset."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        item = seq[frame] if groups.startswith("PerFrame") and frame < len(seq) else seq[0]
        inner = item.get(sequence)
        if inner and name in inner[0]:
            return inner[0].get(name)
    return ds.get(name)


def _transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _check_decoder(path: Path, ds) -> None:
    from pydicom.pixels import get_decoder

    ts = _transfer_syntax(ds)
    if ts is None:
        return  # pydicom assumes implicit VR little endian, which needs no decoder
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ReadError(
            path, f"pixel data in transfer syntax {ts.name} ({ts}), which no DICOM decoder reads"
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise ReadError(
            path,
            f"pixel data compressed as {ts.name} ({ts}) and no decoder for it is installed: install one of "
            f"the packages pydicom names ({needs}), e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg",
        )


def _check_pixel_bytes(path: Path, ds, frames: int) -> None:
    """Uncompressed pixel data must fit in the file (a header claiming more is truncated or wrong)."""
    ts = _transfer_syntax(ds)
    if ts is not None and ts.is_compressed:
        return
    bits = int(ds.get("BitsAllocated", 16) or 16)
    claimed = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    size = path.stat().st_size
    if claimed > size:
        raise ReadError(
            path,
            f"header claims {claimed:,} bytes of pixel data but the file holds {size:,} (truncated or a wrong header)",
        )


def _read_header(path: Path, limits: ReadLimits):
    """The header of one file, checked to hold an image within ``limits`` and decodable here."""
    pydicom = _pydicom(path)
    try:
        with _SizedReader(path) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        modality = str(ds.get("Modality", "") or "").upper()
        if modality in NON_IMAGE_MODALITIES or (
            ("Rows" not in ds or "Columns" not in ds) and "SOPClassUID" in ds
        ):
            raise ReadError(path, f"a DICOM {modality or 'object'} without an image", NON_IMAGE_DICOM)
        if "Rows" not in ds or "Columns" not in ds:
            raise ReadError(
                path, "a DICOM file without SOPClassUID, Rows or Columns (empty or corrupt header)"
            )
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows < 1 or cols < 1 or frames < 1:
            raise ReadError(path, f"image of {rows}x{cols} pixels and {frames} frame(s) is empty")
        if rows * cols > limits.max_pixels:
            raise ReadError(
                path,
                f"{rows}x{cols} = {rows * cols:,} pixels per slice, more than the limit of {limits.max_pixels:,} "
                "(raise it with --max-pixels / ReadLimits.max_pixels)",
                OVER_LIMIT,
            )
        bits, stored = ds.get("BitsAllocated"), ds.get("BitsStored", ds.get("BitsAllocated"))
        if bits not in (1, 8, 16, 32, 64) or stored is None or not 1 <= int(stored) <= int(bits):
            raise ReadError(path, f"BitsAllocated {bits} / BitsStored {stored} is not a valid pixel layout")
        _check_decoder(path, ds)
        _check_pixel_bytes(path, ds, frames)
    except ReadError:
        raise
    except Exception as e:  # pydicom raises many types for broken files
        raise ReadError(path, f"cannot read DICOM header ({type(e).__name__}: {e})") from e
    return ds, rows, cols, frames


def _slices_of(
    path: Path, ds, frames: int
) -> tuple[list[tuple[np.ndarray, DicomSlice]], np.ndarray, np.ndarray]:
    """Per slice: the position (LPS mm) and slice; plus orientation (6,) and pixel spacing (2,)."""
    iop = _group_attr(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _group_attr(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
    if iop is None or spacing is None:
        raise ReadError(
            path,
            "no ImageOrientationPatient / PixelSpacing: not a slice of a volume (a projection image such as CR/DX "
            "is read by the 2D modalities)",
            UNUSABLE,
        )
    iop = _floats(iop, 6, path, "ImageOrientationPatient")
    spacing = _floats(spacing, 2, path, "PixelSpacing")
    normal = np.cross(iop[:3], iop[3:])
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-3):
        raise ReadError(path, f"ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    instance = str(ds.get("SOPInstanceUID", path))
    out = []
    per_frame = bool(ds.get("PerFrameFunctionalGroupsSequence"))
    for f in range(frames):
        ipp = _group_attr(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        if ipp is None:
            raise ReadError(path, "no ImagePositionPatient: cannot place its slices", UNUSABLE)
        pos = _floats(ipp, 3, path, "ImagePositionPatient")
        if frames > 1 and not per_frame:
            step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
            if step is None:
                raise ReadError(
                    path, f"{frames} frames without per-frame positions or SpacingBetweenSlices", UNUSABLE
                )
            pos = pos + f * float(step) * normal
        slope = _group_attr(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _group_attr(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        s = DicomSlice(
            path, f, float(pos @ normal), float(slope if slope is not None else 1.0),
            float(inter if inter is not None else 0.0), f"{instance}#{f}",
        )  # fmt: skip
        out.append((pos, s))
    return out, iop, spacing


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


def _pixels(path: Path, limits: ReadLimits):
    """The full dataset of ``path`` (pixel data included) and its decoded pixel array."""
    pydicom = _pydicom(path)
    try:
        with _SizedReader(path) as f:
            ds = pydicom.dcmread(f)
        return ds, ds.pixel_array
    except ReadError:
        raise
    except Exception as e:
        raise ReadError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e


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


def dicom_picture_size(image: DicomImage) -> tuple[int, int]:
    """``(height, width)`` of a 2D DICOM image from its header (already checked by :func:`scan_dicom`)."""
    return image.rows, image.cols


def voi_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2.1) onto [0, 1].

    Example:
        >>> voi_window(np.array([0.0, 50.0, 100.0]), center=50.5, width=101.0).round(3).tolist()
        [0.0, 0.5, 1.0]
    """
    lo = center - 0.5 - (width - 1) / 2
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * (values > lo)


def read_dicom_picture(image: DicomImage | str | os.PathLike, limits: ReadLimits) -> Picture:
    """A 2D DICOM image as a ``(C, H, W)`` picture in [0, 1] (see the module docstring for the steps).

    Raises:
        ReadError: the file cannot be decoded, holds several frames, or breaks ``limits``.
    """
    if not isinstance(image, DicomImage):
        path = Path(image)
        _, rows, cols, frames = _read_header(path, limits)
        if frames > 1:
            raise ReadError(path, f"{frames} frames: the 2D modalities read single images", UNUSABLE)
        image = DicomImage(path, "", rows, cols)
    path = image.path
    ds, arr = _pixels(path, limits)
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        if arr.ndim == 3 and arr.shape[-1] == 3:  # colour: RGB (pydicom converts YBR)
            top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
            return Picture(np.ascontiguousarray(arr.transpose(2, 0, 1).astype(np.float32) / top), path)
        if arr.ndim != 2:
            raise ReadError(
                path, f"pixel data of shape {arr.shape}, expected one grey or RGB image", UNUSABLE
            )
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            c, w = _first(center), _first(width)
            if w >= 1:
                out = voi_window(values, c, w)
            else:
                out = _minmax(values)
        elif ds.get("VOILUTSequence"):
            lut = ds.VOILUTSequence[0]
            data = np.asarray(lut.LUTData, dtype=np.float64)
            # A LUT is indexed by integers: the modality LUT's output, rounded.
            mapped = np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), ds), dtype=np.float64)
            out = (mapped - data.min()) / max(data.max() - data.min(), 1e-12)
        else:
            out = _minmax(values)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            out = 1.0 - out
    except ReadError:
        raise
    except Exception as e:
        raise ReadError(path, f"cannot apply the DICOM value transforms ({type(e).__name__}: {e})") from e
    return Picture(np.ascontiguousarray(np.clip(out, 0, 1).astype(np.float32)[None]), path)


def _first(value) -> float:
    """The first of a multi-valued attribute (several windows), or the value itself."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
