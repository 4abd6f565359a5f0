"""DICOM headers: reading one file's header (no pixel data), its checks, its slices; decoding pixels.

See :mod:`invcoss.data.dicom` for what is read and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from invcoss.data.limits import DICOM, NON_IMAGE_DICOM, OVER_LIMIT, UNUSABLE, ReadError, ReadLimits

# _SizedReader: pydicom reads element values of the length the file states; the clamp keeps a
# corrupt length of 4 GB from allocating 4 GB (the same guard as the Pillow path's).
from invcoss.data.readers import _SizedReader

INSTALL_HINT = "pip install invcoss[dicom]"

# Modalities whose files hold no image to learn from (a segmentation is a label map, not a scan).
NON_IMAGE_MODALITIES = ("SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "SEG", "REG", "DOC")


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
    """Uncompressed pixel data must fit in the file (a header claiming more is truncated or wrong).

    Compressed pixel data and deflated datasets are left to their decoders (the file is smaller).
    """
    ts = _transfer_syntax(ds)
    if ts is not None and (ts.is_compressed or ts.is_deflated):
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
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ReadError(path, f"{samples} samples per pixel (colour): a volume needs grey slices", UNUSABLE)
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
