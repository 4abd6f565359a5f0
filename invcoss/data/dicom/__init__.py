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

from invcoss.data.dicom.headers import INSTALL_HINT, NON_IMAGE_MODALITIES, DicomSlice
from invcoss.data.dicom.picture import read_dicom_picture, voi_window
from invcoss.data.dicom.series import (
    GAP_FACTOR,
    UNEVEN_TOLERANCE,
    DicomImage,
    DicomScan,
    DicomSeries,
    read_dicom_series,
    scan_dicom,
)

__all__ = [
    "GAP_FACTOR",
    "INSTALL_HINT",
    "NON_IMAGE_MODALITIES",
    "UNEVEN_TOLERANCE",
    "DicomImage",
    "DicomScan",
    "DicomSeries",
    "DicomSlice",
    "read_dicom_picture",
    "read_dicom_series",
    "scan_dicom",
    "voi_window",
]
