"""2D DICOM images (X-ray: CR, DX) as pictures in [0, 1]: modality LUT, VOI window or LUT, MONOCHROME1.

See :mod:`invcoss.data.dicom` for what is read and why.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from invcoss.data.dicom.headers import _pixels, _read_header
from invcoss.data.dicom.series import DicomImage
from invcoss.data.limits import UNUSABLE, ReadError, ReadLimits
from invcoss.data.readers import Picture


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
