"""Readers for the image formats the pre-training data comes in: NIfTI volumes and 2D pictures.

Axis order of what the readers return:

- :func:`read_nifti` returns a :class:`Volume` whose ``array`` is ``(D, H, W)`` float32 after
  reorientation to the closest canonical (RAS+) orientation: ``D`` runs inferior → superior (the
  axial axis, so ``array[k]`` is one axial slice), ``H`` posterior → anterior, ``W`` left → right.
  ``spacing`` is in millimetres in the same ``(D, H, W)`` order.
- :func:`read_picture` returns a :class:`Picture` whose ``array`` is ``(C, H, W)`` float32 in
  [0, 1] (8-bit values divided by 255, 16-bit by 65535), ``C`` = 1 (grey) or 3 (RGB); row 0 is the
  top of the image as stored.

Anything that cannot be read raises :class:`ReadError` naming the file, so a folder scan can
report it and go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class ReadError(ValueError):
    """A file that cannot be read as the image it should be; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Volume:
    """A 3D scan: ``array`` ``(D, H, W)`` float32, ``spacing`` ``(sd, sh, sw)`` in mm.

    ``affine`` is the canonical (RAS+) voxel-to-world matrix of the ``(W, H, D)`` NIfTI axes,
    kept for writing results back in the same world space.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path | None = None

    @property
    def extent(self) -> tuple[float, float, float]:
        """Physical size in mm along ``(D, H, W)``: number of voxels times spacing."""
        return tuple(n * s for n, s in zip(self.array.shape, self.spacing))


@dataclass
class Picture:
    """A 2D image: ``array`` ``(C, H, W)`` float32 in [0, 1] with C = 1 or 3."""

    array: np.ndarray
    path: Path | None = None


def nifti_suffix(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def picture_suffix(path: str | os.PathLike) -> bool:
    """True when the file name ends in a Pillow format we read (PNG, JPEG, TIFF)."""
    return str(path).lower().endswith(PICTURE_SUFFIXES)


def _canonical_nifti(path: Path):
    import nibabel as nib

    if not nifti_suffix(path):
        raise ReadError(path, f"not a NIfTI file (expected a name ending in {' or '.join(NIFTI_SUFFIXES)})")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad headers and bad gzip streams
        raise ReadError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ReadError(path, f"expected a NIfTI-1/2 image, got {type(img).__name__}")
    try:
        return nib.as_closest_canonical(img)
    except Exception as e:
        raise ReadError(path, f"cannot reorient to canonical ({type(e).__name__}: {e})") from e


def _check_frame(path: Path, shape: tuple[int, ...], frame: int) -> None:
    if len(shape) < 2 or len(shape) > 4 or any(s < 1 for s in shape):
        raise ReadError(path, f"expected a 2D, 3D or 4D NIfTI image, got shape {tuple(shape)}")
    frames = shape[3] if len(shape) == 4 else 1
    if not 0 <= frame < frames:
        raise ReadError(path, f"frame {frame} out of range for {frames} frame(s)")


def nifti_geometry(path: str | os.PathLike, frame: int = 0) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """Shape ``(D, H, W)`` and spacing of a NIfTI file from its header only (no voxel data read).

    Raises:
        ReadError: the header cannot be read or the image is not 2D/3D/4D.
    """
    path = Path(path)
    img = _canonical_nifti(path)
    shape = tuple(int(s) for s in img.shape)
    _check_frame(path, shape, frame)
    return _geometry_of(img, shape)


def read_nifti(path: str | os.PathLike, frame: int = 0) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file as a canonical ``(D, H, W)`` volume (see module docstring).

    The data scaling of the header (``scl_slope`` / ``scl_inter``) is applied, so CT comes out in
    Hounsfield units. A 2D image becomes one slice (``D = 1``); of a 4D series the volume number
    ``frame`` is returned. Voxels are returned as stored, NaN included (the preprocessing
    replaces non-finite voxels, see :class:`invcoss.data.Preprocessor`).

    Args:
        path: the file.
        frame: which volume of a 4D series to read.

    Returns:
        :class:`Volume` with float32 ``array`` ``(D, H, W)`` and ``spacing`` in mm, ``(D, H, W)`` order.

    Raises:
        ReadError: the file is not NIfTI, is truncated or corrupt, or ``frame`` is out of range.

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> v = read_nifti(os.path.join(data_path, "standard.nii.gz"))
        >>> v.array.shape, v.spacing
        ((7, 5, 4), (2.0, 3.0, 1.0))
    """
    path = Path(path)
    img = _canonical_nifti(path)
    shape = tuple(int(s) for s in img.shape)
    _check_frame(path, shape, frame)
    try:
        proxy = img.dataobj[..., frame] if len(shape) == 4 else img.dataobj
        data = np.asarray(proxy, dtype=np.float32)
    except Exception as e:  # truncated gzip streams raise EOFError, short files ValueError/OSError
        raise ReadError(path, f"cannot read voxel data ({type(e).__name__}: {e})") from e
    if data.ndim == 2:
        data = data[:, :, None]
    (d, h, w), spacing = _geometry_of(img, shape)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (D=z, H=y, W=x)
    return Volume(array=array, spacing=spacing, affine=np.asarray(img.affine, dtype=np.float64), path=path)


def _geometry_of(img, shape: tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape3 = (shape + (1,))[:3]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    return (shape3[2], shape3[1], shape3[0]), (zooms[2], zooms[1], zooms[0])


def read_picture(path: str | os.PathLike) -> Picture:
    """Read a PNG, JPEG or TIFF file as a ``(C, H, W)`` float32 array in [0, 1].

    Grey images (8- or 16-bit) give ``C = 1``; colour, palette and alpha images give ``C = 3``
    (alpha is dropped). Float TIFFs are clipped to [0, 1].

    Raises:
        ReadError: unsupported suffix, or Pillow cannot decode the file.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"
        >>> Image.fromarray(np.full((4, 6), 255, dtype=np.uint8)).save(p)
        >>> pic = read_picture(p)
        >>> pic.array.shape, float(pic.array.max())
        ((1, 4, 6), 1.0)
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not picture_suffix(path):
        raise ReadError(path, f"not a picture file (expected one of {', '.join(PICTURE_SUFFIXES)})")
    try:
        with Image.open(path) as im:
            im.load()
            array = _picture_array(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ReadError(path, f"cannot decode image ({type(e).__name__}: {e})") from e
    return Picture(array=array, path=path)


def _picture_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "L"):
        a = np.asarray(im.convert("L"), dtype=np.float32)[None] / 255.0
    elif mode.startswith("I;16") or mode == "I":
        raw = np.asarray(im, dtype=np.float64)
        # 16-bit greyscale comes as "I;16" or, through some decoders, as 32-bit "I" with 16-bit values.
        top = 65535.0 if raw.max(initial=0) <= 65535 else float(raw.max())
        a = (np.clip(raw, 0, None) / top).astype(np.float32)[None]
    elif mode == "F":
        a = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[None]
    elif mode == "LA":
        a = np.asarray(im.convert("L"), dtype=np.float32)[None] / 255.0
    else:
        a = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(a)
