"""Small DICOM files with known geometry, written with pydicom, for the DICOM reader's tests and fuzzing.

:func:`slice_dataset` places pixel ``(row j, column i)`` of a slice at the LPS position
``ipp + i * col_spacing * iop[:3] + j * row_spacing * iop[3:]`` (DICOM PS3.3 C.7.6.2.1.1), written
here independently of the reader; :func:`lps_to_ras` is the patient-to-NIfTI flip of x and y.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def _base(sop_class: str, modality: str, series_uid: str, ts=ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "PHANTOM"
    return ds


def _pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def slice_dataset(
    pixels: np.ndarray,
    ipp,
    iop,
    spacing=(1.0, 1.0),
    series_uid: str = "1.2.826.0.1.3680043.8.498.10",
    slope: float = 1.0,
    intercept: float = 0.0,
    instance: int = 1,
) -> Dataset:
    """One CT slice: ``pixels`` ``(rows, cols)`` int16/uint16, stored values (before rescale)."""
    ds = _base(CTImageStorage, "CT", series_uid)
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.InstanceNumber = instance
    _pixels(ds, pixels)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    stored: np.ndarray,
    iop=(1, 0, 0, 0, 1, 0),
    spacing=(1.0, 1.0),
    steps=None,
    origin=(0.0, 0.0, 0.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str = "1.2.826.0.1.3680043.8.498.10",
    shuffle: int | None = 0,
) -> list[Path]:
    """Write ``stored`` ``(K, rows, cols)`` as K slice files along the normal of ``iop``.

    Slice ``k`` lies at ``origin + positions[k] * normal``; ``steps`` gives the K - 1 distances
    (default 2 mm each). Names and ``InstanceNumber`` are shuffled with the seed ``shuffle`` (None:
    in order), so only the positions tell the order.
    """
    k = stored.shape[0]
    steps = np.full(k - 1, 2.0) if steps is None else np.asarray(steps, dtype=float)
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    order = np.arange(k) if shuffle is None else np.random.default_rng(shuffle).permutation(k)
    paths = []
    for name, i in enumerate(order):
        ds = slice_dataset(
            stored[i], np.asarray(origin) + positions[i] * normal, iop, spacing, series_uid, slope, intercept,
            instance=int(k - name),
        )  # fmt: skip
        paths.append(write(ds, folder / f"IM{name:04d}.dcm"))
    return paths


def lps_to_ras(p: np.ndarray) -> np.ndarray:
    return np.asarray(p, dtype=float) * np.array([-1.0, -1.0, 1.0])


def multiframe(stored: np.ndarray, iop, spacing, step: float, origin, slope=1.0, intercept=0.0) -> Dataset:
    """An enhanced CT file: ``stored`` ``(K, rows, cols)`` as K frames with per-frame positions."""
    ds = _base(ENHANCED_CT_STORAGE, "CT", "1.2.826.0.1.3680043.8.498.20")
    ds.NumberOfFrames = stored.shape[0]
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    shared = Dataset()
    orient, measures, value = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [float(v) for v in iop]
    measures.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    measures.SliceThickness = step
    value.RescaleSlope, value.RescaleIntercept, value.RescaleType = slope, intercept, "HU"
    shared.PlaneOrientationSequence = [orient]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [value]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    # Frames stored in reverse order: the positions, not the frame order, must tell the order.
    for k in range(stored.shape[0]):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [
            float(v) for v in np.asarray(origin) + (stored.shape[0] - 1 - k) * step * normal
        ]
        item.PlanePositionSequence = [pos]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    _pixels(ds, stored[::-1])
    return ds


def projection(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", window=None, modality: str = "DX"
) -> Dataset:
    """A 2D X-ray image (DX or CR) of stored ``pixels`` ``(rows, cols)`` uint16."""
    ds = _base(DX_STORAGE, modality, "1.2.826.0.1.3680043.8.498.30")
    _pixels(ds, pixels)
    ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    return ds


def non_image(kind: str) -> Dataset:
    """A structured report (``SR``) or an RT structure set (``RTSTRUCT``): DICOM without an image."""
    ds = _base(SR_STORAGE if kind == "SR" else RTSTRUCT_STORAGE, kind, "1.2.826.0.1.3680043.8.498.40")
    ds.ContentDate = "20260101"
    return ds
