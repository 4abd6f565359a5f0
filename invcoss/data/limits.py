"""What one input file may be: the :class:`ReadLimits` checked from its header, and the
:class:`ReadError` it raises when it breaks one or cannot be read or used.

``ReadError`` is the one per-file error type of :mod:`invcoss.data`: readers, the
:class:`~invcoss.data.Preprocessor` and the folder scans raise nothing else for a bad file, and
its ``kind`` (one of ``SKIP_KINDS``) is what a ``preprocess`` summary counts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# Why a file was skipped: the ``kind`` of a ReadError, counted in a preprocess summary.
NOT_AN_IMAGE = "not an image"
DICOM = "DICOM (pydicom not installed)"
NON_IMAGE_DICOM = "non-image DICOM"
UNREADABLE = "unreadable"
OVER_LIMIT = "over a limit"
UNUSABLE = "no usable sample"
FAILED = "failed"
SKIP_KINDS = (NOT_AN_IMAGE, DICOM, NON_IMAGE_DICOM, UNREADABLE, OVER_LIMIT, UNUSABLE, FAILED)


class ReadError(ValueError):
    """A file that cannot be read or used as the image it should be; the message names the file.

    The one error type of everything that reads one file (readers, :class:`~invcoss.data.Preprocessor`):
    a folder scan catches it, names the file and goes on.

    Attributes:
        path: the file.
        reason: what is wrong, for a person.
        kind: the category counted in summaries, one of ``SKIP_KINDS``: ``not an image`` (a
            suffix the modality does not read), ``DICOM (pydicom not installed)`` (a DICOM file
            without the ``invcoss[dicom]`` extra), ``non-image DICOM`` (a structured report, RT
            structure set and the like in a DICOM folder), ``unreadable``
            (corrupt, truncated, inconsistent header), ``over a limit`` (:class:`ReadLimits`),
            ``no usable sample`` (e.g. a 2D image for a 3D modality), ``failed`` (any other error
            while preprocessing or writing the file).
    """

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = UNREADABLE) -> None:
        self.path = Path(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ReadLimits:
    """Limits checked from a file's header before any voxel or pixel is decoded.

    Each one guards memory or meaning, and each can be raised (``invcoss-cli preprocess
    --max-voxels / --max-pixels / --min-spacing / --max-spacing``). A file over a limit raises
    :class:`ReadError` of kind ``over a limit`` naming the limit.

    A further check has no option because no valid file fails it: the voxel bytes the header
    implies must fit in the file (``.nii``), or in what deflate can expand the file to (1032
    times its size, ``.nii.gz``).

    Attributes:
        max_voxels: voxels of one volume (one frame of a series), also after resampling.
            Default ``2**29`` (2 GiB as float32; a 512x512x2048 CT).
        max_pixels: pixels of one 2D image. Default 100 million (1.2 GB as float32 RGB).
        min_spacing, max_spacing: the range of voxel spacing in mm accepted on every axis.

    Example:
        >>> ReadLimits(max_voxels=10**9).max_voxels
        1000000000
    """

    max_voxels: int = 2**29
    max_pixels: int = 100_000_000
    min_spacing: float = 0.01
    max_spacing: float = 50.0

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ReadLimits.{name} must be a positive integer, got {v!r}")
        if not (0 < self.min_spacing < self.max_spacing < math.inf):
            raise ValueError(
                "ReadLimits expects 0 < min_spacing < max_spacing (finite), got "
                f"min_spacing={self.min_spacing}, max_spacing={self.max_spacing}"
            )


DEFAULT_LIMITS = ReadLimits()
