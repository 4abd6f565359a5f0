"""Writers for NIfTI volumes and PNG images, atomic and byte-for-byte reproducible.

A ``(D, H, W)`` array is written in the axis convention of :func:`invcoss.data.read_nifti`
(D inferior → superior, H posterior → anterior, W left → right, RAS+ affine), so
``read_nifti(write_nifti(p, a, s)).array`` gives ``a`` back. ``.nii.gz`` files are gzipped with a
zero timestamp so the same array always gives the same bytes.
"""

from __future__ import annotations

import gzip
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
