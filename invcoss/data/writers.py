"""Writers for NIfTI volumes, PNG images and synthetic DICOM series, atomic and byte-for-byte
reproducible.

A ``(D, H, W)`` array is written in the axis convention of :func:`invcoss.data.read_nifti`
(D inferior → superior, H posterior → anterior, W left → right, RAS+ affine), so
``read_nifti(write_nifti(p, a, s)).array`` gives ``a`` back. ``.nii.gz`` files are gzipped with a
zero timestamp so the same array always gives the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from invcoss.data.atomic import atomic_write_bytes


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    spacing: Sequence[float],
    dtype: np.dtype | type | None = None,
    description: str = "",
    display_range: tuple[float, float] | None = None,
) -> Path:
    """Write a ``(D, H, W)`` array as a NIfTI-1 file (``.nii`` or ``.nii.gz``) with spacing in mm.

    The bytes are those of :func:`nifti_bytes`.

    Args:
        path: target file; the suffix picks compression.
        array: ``(D, H, W)`` voxels (see the module docstring for the axis order).
        spacing: ``(sd, sh, sw)`` in mm.
        dtype: on-disk dtype (default: the array's).
        description: the header's ``descrip`` (at most 80 ASCII characters; viewers show it).
        display_range: ``(cal_min, cal_max)``, the window a viewer opens the volume with.

    Raises:
        ValueError: array not 3D, spacing not 3 positive numbers, suffix not ``.nii``/``.nii.gz``,
            or a description longer than 80 characters.

    Example:
        >>> import tempfile, pathlib
        >>> from invcoss.data import read_nifti
        >>> p = write_nifti(pathlib.Path(tempfile.mkdtemp()) / "v.nii.gz", np.ones((3, 4, 5)), (2.0, 1.0, 1.0))
        >>> read_nifti(p).array.shape, read_nifti(p).spacing
        ((3, 4, 5), (2.0, 1.0, 1.0))
    """
    path = Path(path)
    blob = nifti_bytes(
        array, spacing, dtype, gz=_nifti_gz(path), description=description, display_range=display_range
    )
    return atomic_write_bytes(path, blob)


def _nifti_gz(path: Path) -> bool:
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"write_nifti expects a path ending in .nii or .nii.gz, got {path}")
    return name.endswith(".gz")


def nifti_bytes(
    array: np.ndarray,
    spacing: Sequence[float],
    dtype: np.dtype | type | None = None,
    gz: bool = True,
    description: str = "",
    display_range: tuple[float, float] | None = None,
) -> bytes:
    """The bytes :func:`write_nifti` writes for ``array`` (gzipped with a zero timestamp when ``gz``).

    Example:
        >>> nifti_bytes(np.zeros((2, 2, 2)), (1.0, 1.0, 1.0)) == nifti_bytes(np.zeros((2, 2, 2)), (1, 1, 1))
        True
    """
    import nibabel as nib

    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_nifti expects array of shape (D, H, W), got {tuple(array.shape)}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"write_nifti expects spacing of 3 positive values (sd, sh, sw), got {spacing}")
    if len(description) > 80 or not description.isascii():
        raise ValueError(
            f"write_nifti expects a description of at most 80 ASCII characters, got {description!r}"
        )
    sd, sh, sw = spacing
    affine = np.diag([sw, sh, sd, 1.0])
    data = array.transpose(2, 1, 0).astype(dtype or array.dtype, copy=False)
    img = nib.Nifti1Image(np.asfortranarray(data), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if description:
        img.header["descrip"] = description.encode("ascii")
    if display_range is not None:
        img.header["cal_min"], img.header["cal_max"] = display_range
    blob = img.to_bytes()
    return gzip.compress(blob, compresslevel=6, mtime=0) if gz else blob


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a ``(C, H, W)`` (C = 1 or 3) or ``(H, W)`` array in [0, 1] as an 8-bit PNG.

    Values are clipped to [0, 1] and rounded to 0..255 (the bytes of :func:`png_bytes`).

    Raises:
        ValueError: wrong shape or a path not ending in ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_png expects a path ending in .png, got {path}")
    return atomic_write_bytes(path, png_bytes(array))


def png_bytes(array: np.ndarray) -> bytes:
    """The bytes :func:`write_png` writes for ``array``.

    Example:
        >>> png_bytes(np.zeros((4, 4)))[:4]
        b'\\x89PNG'
    """
    from PIL import Image

    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(
            f"write_png expects array of shape (H, W), (1, H, W) or (3, H, W), got {tuple(array.shape)}"
        )
    u8 = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    im = Image.fromarray(u8[0] if u8.shape[0] == 1 else u8.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# SOP classes of the series write_dicom_series makes, by DICOM modality.
_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def dicom_rescale_slope(max_abs: float) -> float:
    """The power-of-two RescaleSlope that stores values up to ``max_abs`` in int16 (with margin).

    Example:
        >>> dicom_rescale_slope(1024.0), dicom_rescale_slope(4.0)
        (0.0625, 0.000244140625)
    """
    return float(2.0 ** np.ceil(np.log2(max(max_abs, 1e-30) / 32000.0)))


def write_dicom_series(
    folder: str | os.PathLike,
    array: np.ndarray,
    spacing: Sequence[float],
    modality: str,
    description: str,
    max_abs: float,
    window: tuple[float, float] | None = None,
    uid_seed: str | None = None,
) -> Path:
    """Write a ``(D, H, W)`` synthetic volume as a DICOM series, one file per slice (needs pydicom).

    The series is marked as what it is: ImageType ``DERIVED\\SECONDARY``, the description as
    SeriesDescription and DerivationDescription, PatientName ``SYNTHETIC^INVCOSS`` and PatientID
    ``SYNTHETIC`` (no identifier of any person), UIDs derived from ``uid_seed`` (default: a hash
    of the values), so the same volume always gives the same bytes. Geometry: the same physical space as
    :func:`write_nifti`'s RAS+ affine, in DICOM's LPS coordinates, with the usual axial orientation
    (ImageOrientationPatient ``1\\0\\0\\0\\1\\0``: each slice is stored flipped in H and W, anterior
    at the top, the patient's right on the left), ImagePositionPatient per slice, PixelSpacing and
    SliceThickness. Values are int16 with a power-of-two RescaleSlope
    (:func:`dicom_rescale_slope` of ``max_abs``), so a viewer reads ``array`` to within half a step
    (1/32 HU for CT).

    Args:
        folder: created; receives ``0000.dcm``, ``0001.dcm``, ... (inferior to superior).
        array: ``(D, H, W)`` in the axis convention of :func:`write_nifti`.
        spacing: ``(sd, sh, sw)`` in mm.
        modality: ``"CT"`` or ``"MR"``.
        description: what the volume is (at most 64 characters: a DICOM LO value).
        max_abs: the largest ``|value|`` the series must hold (values beyond it are clipped).
        window: ``(low, high)`` stored as WindowCenter/WindowWidth.
        uid_seed: what the study, series, frame-of-reference and instance UIDs are derived from.

    Raises:
        ImportError: pydicom is not installed (``pip install invcoss[dicom]``).
        ValueError: wrong shape, spacing, modality or description.
    """
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    except ImportError:
        raise ImportError("writing DICOM needs pydicom: pip install 'invcoss[dicom]'") from None
    array = np.asarray(array)
    spacing = tuple(float(s) for s in spacing)
    if array.ndim != 3 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(
            f"write_dicom_series expects array (D, H, W) and 3 positive spacings, got {array.shape}, {spacing}"
        )
    if modality not in _SOP_CLASS:
        raise ValueError(f"write_dicom_series expects modality one of {sorted(_SOP_CLASS)}, got {modality!r}")
    if len(description) > 64:
        raise ValueError(
            f"write_dicom_series expects a description of at most 64 characters, got {description!r}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd, sh, sw = spacing
    depth, height, width = array.shape
    slope = dicom_rescale_slope(max_abs)
    stored = np.clip(np.round(array / slope), -32768, 32767).astype(np.int16)[:, ::-1, ::-1]
    seed = uid_seed or hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=[seed, role])

    study, series, frame = uid("study"), uid("series"), uid("frame")
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = uid(f"slice {k}")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.PatientName, ds.PatientID = "SYNTHETIC^INVCOSS", "SYNTHETIC"
        ds.SeriesDescription = ds.DerivationDescription = ds.StudyDescription = description
        ds.BurnedInAnnotation = "NO"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        # pixel (0, 0) of slice k is voxel (k, H-1, W-1): RAS ((W-1) sw, (H-1) sh, k sd) -> LPS
        ds.ImagePositionPatient = [-(width - 1) * sw, -(height - 1) * sh, k * sd]
        ds.PixelSpacing = [sh, sw]  # row spacing (between rows), column spacing
        ds.SliceThickness = sd
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0
        if modality == "CT":
            ds.RescaleType = "HU"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = (window[0] + window[1]) / 2, window[1] - window[0]
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        atomic_write_bytes(folder / f"{k:04d}.dcm", buf.getvalue())
    return folder


def read_dicom_series_array(folder: str | os.PathLike) -> np.ndarray:
    """The ``(D, H, W)`` float32 values of a series :func:`write_dicom_series` wrote (rescaled).

    Slices are ordered by ImagePositionPatient along the slice normal and unflipped into the axis
    convention of :func:`write_nifti`. For general DICOM input use the project's DICOM reader.
    """
    import pydicom

    slices = [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    vol = np.stack([ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) for ds in slices])
    return vol[:, ::-1, ::-1].astype(np.float32) + np.float32(slices[0].RescaleIntercept)
