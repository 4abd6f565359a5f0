"""Readers for the image formats the pre-training data comes in: NIfTI volumes and 2D pictures.

Axis order of what the readers return:

- :func:`read_nifti` returns a :class:`Volume` whose ``array`` is ``(D, H, W)`` float32 after
  reorientation to the closest canonical (RAS+) orientation: ``D`` runs inferior → superior (the
  axial axis, so ``array[k]`` is one axial slice), ``H`` posterior → anterior, ``W`` left → right.
  ``spacing`` is in millimetres in the same ``(D, H, W)`` order.
- :func:`read_picture` returns a :class:`Picture` whose ``array`` is ``(C, H, W)`` float32 in
  [0, 1] (8-bit values divided by 255, 16-bit by 65535), ``C`` = 1 (grey) or 3 (RGB); row 0 is the
  top of the image as stored.

Anything wrong with one file raises :class:`ReadError` naming the file and the reason, and
nothing else escapes a reader (errors of nibabel and Pillow are wrapped), so a folder scan can
report the file and go on. :class:`ReadLimits` are checked from the header, before any voxel or
pixel is decoded: a 1 KB file whose header claims a billion voxels is rejected without allocating
them.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from invcoss.data.limits import (
    DEFAULT_LIMITS,
    DICOM,
    FAILED,
    NON_IMAGE_DICOM,
    NOT_AN_IMAGE,
    OVER_LIMIT,
    SKIP_KINDS,
    UNREADABLE,
    UNUSABLE,
    ReadError,
    ReadLimits,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DICOM",
    "FAILED",
    "NON_IMAGE_DICOM",
    "NOT_AN_IMAGE",
    "OVER_LIMIT",
    "SKIP_KINDS",
    "UNREADABLE",
    "UNUSABLE",
    "Picture",
    "ReadError",
    "ReadLimits",
    "Volume",
    "VolumeHeader",
    "canonical_geometry",
    "canonical_volume",
    "looks_like_dicom",
    "nifti_geometry",
    "nifti_suffix",
    "picture_size",
    "picture_suffix",
    "read_nifti",
    "read_nifti_header",
    "read_picture",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")

# Deflate cannot compress better than 1032:1, so a .nii.gz of n bytes holds at most 1032 n bytes.
_DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class VolumeHeader:
    """What a NIfTI header says, in the canonical axes of :func:`read_nifti`.

    ``shape`` ``(D, H, W)`` of one volume, ``spacing`` in mm in the same order, ``frames`` the
    number of volumes (4D series; 1 otherwise), ``ndim`` the dimensions stored in the file.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    frames: int
    ndim: int


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


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm`` name or a file with the DICOM preamble (``DICM`` at byte 128)."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _load_nifti(path: Path):
    import nibabel as nib

    if not nifti_suffix(path):
        raise ReadError(
            path, f"not a NIfTI file (expected a name ending in {' or '.join(NIFTI_SUFFIXES)})", NOT_AN_IMAGE
        )
    try:
        img = nib.load(str(path))  # the header only; voxel data stays on disk
    except Exception as e:  # nibabel raises many types for bad headers and bad gzip streams
        raise ReadError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ReadError(path, f"expected a NIfTI-1/2 image, got {type(img).__name__}")
    return img


def _check_header(path: Path, img, limits: ReadLimits) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape checks and :class:`ReadLimits` from the header; returns the stored shape and orientation."""
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in img.header.get_data_shape())
        itemsize = img.header.get_data_dtype().itemsize
        # Where the voxels are read from: the loaded image's header may no longer carry it.
        offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
        zooms = [float(z) for z in img.header.get_zooms()[: min(len(shape), 3)]]
    except Exception as e:
        raise ReadError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    if len(shape) < 2 or len(shape) > 4 or any(s < 1 for s in shape):
        raise ReadError(path, f"expected a 2D, 3D or 4D NIfTI image, got shape {tuple(shape)}")
    voxels = math.prod(shape[:3])
    if voxels > limits.max_voxels:
        raise ReadError(
            path,
            f"{'x'.join(map(str, shape[:3]))} = {voxels:,} voxels per volume, more than the limit "
            f"of {limits.max_voxels:,} (raise it with --max-voxels / ReadLimits.max_voxels)",
            OVER_LIMIT,
        )
    claimed = math.prod(shape) * itemsize
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ReadError(path, f"cannot open ({e.strerror or e})") from e
    gz = str(path).lower().endswith(".gz")
    room = size * _DEFLATE_MAX_RATIO if gz else size - offset
    if claimed > room:
        holds = (
            f"a gzip file of {size:,} bytes holds at most {room:,}"
            if gz
            else f"the file holds {max(room, 0):,} after its {offset:,}-byte header"
        )
        raise ReadError(
            path, f"header claims {claimed:,} bytes of voxel data but {holds} (truncated or a wrong header)"
        )
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise ReadError(path, f"voxel spacing {tuple(zooms)} mm is not positive and finite")
    out = [z for z in zooms if not limits.min_spacing <= z <= limits.max_spacing]
    if out:
        raise ReadError(
            path,
            f"voxel spacing {tuple(round(z, 6) for z in zooms)} mm is outside "
            f"[{limits.min_spacing}, {limits.max_spacing}] mm "
            "(raise the range with --min-spacing / --max-spacing, ReadLimits.min_spacing / max_spacing)",
            OVER_LIMIT,
        )
    try:
        ornt = nib.io_orientation(img.affine)
    except Exception as e:
        raise ReadError(path, f"cannot find the orientation ({type(e).__name__}: {e})") from e
    if np.isnan(ornt).any():
        raise ReadError(path, "cannot find the orientation (degenerate affine)")
    return shape, ornt


def _header_of(shape: tuple[int, ...], zooms, ornt: np.ndarray) -> VolumeHeader:
    shape3 = (shape + (1, 1))[:3]
    zooms3 = ([float(z) for z in zooms[: min(len(shape), 3)]] + [1.0, 1.0])[:3]
    canon_shape, canon_zooms = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (new, _) in enumerate(ornt):
        canon_shape[int(new)], canon_zooms[int(new)] = shape3[axis], zooms3[axis]
    frames = shape[3] if len(shape) == 4 else 1
    # Canonical (x, y, z) -> (D=z, H=y, W=x).
    return VolumeHeader(tuple(canon_shape[::-1]), tuple(canon_zooms[::-1]), frames, len(shape))  # type: ignore[arg-type]


def read_nifti_header(path: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> VolumeHeader:
    """Shape, spacing and frame count of a NIfTI file from its header only (no voxel data read).

    Raises:
        ReadError: the header cannot be read, the image is not 2D/3D/4D, or it breaks ``limits``.

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> read_nifti_header(os.path.join(data_path, "example4d.nii.gz")).frames
        2
    """
    path = Path(path)
    img = _load_nifti(path)
    shape, ornt = _check_header(path, img, limits)
    return _header_of(shape, img.header.get_zooms(), ornt)


def nifti_geometry(
    path: str | os.PathLike, frame: int = 0, limits: ReadLimits = DEFAULT_LIMITS
) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """Shape ``(D, H, W)`` and spacing of a NIfTI file from its header only (no voxel data read).

    Raises:
        ReadError: the header cannot be read, the image is not 2D/3D/4D, ``frame`` is out of range,
            or the header breaks ``limits``.
    """
    header = read_nifti_header(path, limits)
    if not 0 <= frame < header.frames:
        raise ReadError(path, f"frame {frame} out of range for {header.frames} frame(s)")
    return header.shape, header.spacing


def read_nifti(path: str | os.PathLike, frame: int = 0, limits: ReadLimits = DEFAULT_LIMITS) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file as a canonical ``(D, H, W)`` volume (see module docstring).

    The data scaling of the header (``scl_slope`` / ``scl_inter``) is applied, so CT comes out in
    Hounsfield units. A 2D image becomes one slice (``D = 1``); of a 4D series the volume number
    ``frame`` is returned (only that frame is decoded). Voxels are returned as stored, NaN
    included (the preprocessing replaces non-finite voxels, see :class:`invcoss.data.Preprocessor`).
    ``limits`` are checked from the header before any voxel is decoded.

    Args:
        path: the file.
        frame: which volume of a 4D series to read.
        limits: see :class:`ReadLimits`.

    Returns:
        :class:`Volume` with float32 ``array`` ``(D, H, W)`` and ``spacing`` in mm, ``(D, H, W)`` order.

    Raises:
        ReadError: the file is not NIfTI, is truncated or corrupt, breaks ``limits``, or ``frame``
            is out of range.

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> v = read_nifti(os.path.join(data_path, "standard.nii.gz"))
        >>> v.array.shape, v.spacing
        ((7, 5, 4), (2.0, 3.0, 1.0))
    """

    path = Path(path)
    img = _load_nifti(path)
    shape, ornt = _check_header(path, img, limits)
    header = _header_of(shape, img.header.get_zooms(), ornt)
    if not 0 <= frame < header.frames:
        raise ReadError(path, f"frame {frame} out of range for {header.frames} frame(s)")
    try:
        proxy = img.dataobj[..., frame] if len(shape) == 4 else img.dataobj
        data = np.asarray(proxy, dtype=np.float32)
        if data.ndim == 2:
            data = data[:, :, None]
        return canonical_volume(data, np.asarray(img.affine, dtype=np.float64), path, ornt, header.spacing)
    except Exception as e:  # truncated gzip streams raise EOFError, short files ValueError/OSError
        raise ReadError(path, f"cannot read voxel data ({type(e).__name__}: {e})") from e


def canonical_geometry(
    shape: tuple[int, int, int], affine: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Canonical ``(D, H, W)`` shape and spacing of voxels ``shape`` ``(x, y, z)`` under ``affine``.

    Example:
        >>> canonical_geometry((4, 5, 6), np.diag([-2.0, 1.0, 3.0, 1.0]))
        ((6, 5, 4), (3.0, 1.0, 2.0))
    """
    import nibabel as nib

    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    h = _header_of(tuple(shape), zooms, nib.io_orientation(affine))
    return h.shape, h.spacing


def canonical_volume(
    data: np.ndarray, affine: np.ndarray, path: Path | None, ornt=None, spacing=None
) -> Volume:
    """The :class:`Volume` of voxels ``data`` ``(x, y, z)`` (NIfTI index order) placed by ``affine``.

    Reorients to the closest canonical (RAS+) orientation as :func:`read_nifti` does (what
    nibabel's ``as_closest_canonical`` does, on an array): every reader gives the same array and
    affine for the same voxels in the same place. ``spacing`` ``(D, H, W)`` defaults to the
    lengths of the affine's columns (a NIfTI file passes its header's).
    """
    import nibabel as nib

    if ornt is None:
        ornt = nib.io_orientation(affine)
    shape3 = data.shape
    data = nib.orientations.apply_orientation(data, ornt)
    affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, shape3)
    if spacing is None:
        spacing = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[::-1])
    array = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32)  # (x, y, z) -> (D=z, H=y, W=x)
    return Volume(array=array, spacing=spacing, affine=affine, path=path)


@contextmanager
def _pillow_unbounded() -> Iterator[None]:
    # Pillow refuses images over its own global pixel bound at open(); ReadLimits.max_pixels is
    # checked instead, from the same header, so the bound is lifted while one file is opened.
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


class _SizedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than is left in it.

    CPython allocates ``n`` bytes before reading, and Pillow reads chunk and tag lengths taken from
    the file, so a 100-byte PNG whose IDAT length says 4 GB would allocate 4 GB. Clamping ``n``
    changes no result: a read never returns more than is left.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(str(path), "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(self._size - self.tell(), 0))
        return super().read(size)


# Channels of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _check_png_data(path: Path, f) -> None:
    """A PNG's pixel bytes must fit in what its IDAT chunks can inflate to (1032 times their size).

    Pillow allocates the whole image before decoding, so a 70-byte file claiming 10000x10000 RGBA
    would take 400 MB before it is found truncated. Reads only the chunk headers and leaves ``f``
    where it was.
    """
    where = f.tell()
    f.seek(0)
    head = f.read(33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return  # Pillow reports a broken signature or header itself
    width, height, depth, colour = struct.unpack_from(">IIBB", head, 16)
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    claimed = (width * height * bits + 7) // 8  # a lower bound: no filter bytes
    idat, pos = 0, 8
    size = os.fstat(f.fileno()).st_size
    while idat * _DEFLATE_MAX_RATIO < claimed:
        f.seek(pos)
        chunk = f.read(8)
        if len(chunk) < 8 or chunk[4:] == b"IEND":
            break
        length = struct.unpack(">I", chunk[:4])[0]
        if chunk[4:] == b"IDAT":
            idat += min(length, size - pos - 8)  # a chunk running past the end holds only the rest
        pos += 12 + length
    f.seek(where)
    if idat * _DEFLATE_MAX_RATIO < claimed:
        raise ReadError(
            path,
            f"header claims {width}x{height} pixels ({claimed:,} bytes) but its {idat:,} bytes of "
            f"compressed data inflate to at most {idat * _DEFLATE_MAX_RATIO:,} (truncated or a wrong header)",
        )


def _check_tiles(path: Path, im) -> None:
    """The pixel data a file points to (Pillow's tiles: TIFF strips) must cover the whole image.

    Pillow leaves uncovered pixels at zero, so a TIFF whose width or length was raised past its
    strips read as an image of zeros (6x65535 pixels from a 284-byte file).
    """
    width, height = im.size
    covered = 0
    for tile in im.tile:
        x0, y0, x1, y1 = tile[1]
        covered += max(min(x1, width) - max(x0, 0), 0) * max(min(y1, height) - max(y0, 0), 0)
    if im.tile and covered < width * height:
        raise ReadError(
            path,
            f"its pixel data covers {covered:,} of the {width}x{height} = {width * height:,} pixels "
            "of its header (truncated or a wrong header)",
        )


def _check_tiff_data(path: Path, im, size: int) -> None:
    """An uncompressed TIFF must hold, after its first strip (or tile), the bytes of its pixels.

    The strips can cover the whole image while their offsets point near or past the end of the
    file; Pillow then allocates the whole image (up to the pixel limit) before it finds the data
    missing. Uncompressed pixels take exactly width x height x bits per pixel / 8 bytes, and
    Pillow reads a strip from its offset whatever its byte count says, so the file must hold at
    least that many bytes from its first strip offset on. Compressed TIFFs are left to their
    decoders.
    """
    tags = im.tag_v2
    if tags.get(259, 1) != 1:
        return
    offsets = tags.get(273) or tags.get(324)
    if not offsets:
        return  # Pillow reports a TIFF without pixel data itself
    samples = int(tags.get(277, 1))
    bits = tags.get(258, (1,))
    bits = tuple(bits) if isinstance(bits, tuple | list) else (bits,)
    per_pixel = sum(bits) if len(bits) == samples else bits[0] * samples
    width, height = im.size
    claimed = width * height * per_pixel // 8
    first = min(int(o) for o in offsets)
    held = max(size - first, 0)
    if held < claimed:
        raise ReadError(
            path,
            f"header claims {width}x{height} uncompressed pixels ({claimed:,} bytes) but the file holds "
            f"{held:,} bytes from its first strip on (truncated or a wrong header)",
        )


@contextmanager
def _open_picture(path: Path, limits: ReadLimits) -> Iterator:
    """The Pillow image of ``path`` (header read, pixels not yet), after the suffix and pixel checks.

    Any error of Pillow inside the block becomes a :class:`ReadError` naming the file.
    """
    from PIL import Image

    if not picture_suffix(path):
        raise ReadError(
            path, f"not a picture file (expected one of {', '.join(PICTURE_SUFFIXES)})", NOT_AN_IMAGE
        )
    try:
        with _SizedReader(path) as f, _pillow_unbounded(), Image.open(f) as im:
            width, height = im.size
            if width < 1 or height < 1:
                raise ReadError(path, f"image of {width}x{height} pixels is empty")
            if width * height > limits.max_pixels:
                raise ReadError(
                    path,
                    f"{width}x{height} = {width * height:,} pixels, more than the limit of "
                    f"{limits.max_pixels:,} (raise it with --max-pixels / ReadLimits.max_pixels)",
                    OVER_LIMIT,
                )
            if im.format == "PNG":
                _check_png_data(path, f)
            _check_tiles(path, im)
            if im.format == "TIFF":
                _check_tiff_data(path, im, f._size)
            yield im
    except ReadError:
        raise
    except (
        Exception
    ) as e:  # Pillow raises many types on corrupt files (OSError, SyntaxError, struct.error, ...)
        raise ReadError(path, f"cannot decode image ({type(e).__name__}: {e})") from e


def picture_size(path: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """``(height, width)`` of a picture from its header only, checked against ``limits``.

    Raises:
        ReadError: unsupported suffix, Pillow cannot identify the file, or it breaks ``limits``.
    """
    with _open_picture(Path(path), limits) as im:
        width, height = im.size
    return height, width


def read_picture(path: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> Picture:
    """Read a PNG, JPEG or TIFF file as a ``(C, H, W)`` float32 array in [0, 1].

    Grey images (8- or 16-bit) give ``C = 1``; colour, palette and alpha images give ``C = 3``
    (alpha is dropped). Float TIFFs are clipped to [0, 1]. ``limits.max_pixels`` is checked from
    the header before the pixels are decoded.

    Raises:
        ReadError: unsupported suffix, Pillow cannot decode the file, or it breaks ``limits``.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"
        >>> Image.fromarray(np.full((4, 6), 255, dtype=np.uint8)).save(p)
        >>> pic = read_picture(p)
        >>> pic.array.shape, float(pic.array.max())
        ((1, 4, 6), 1.0)
    """
    path = Path(path)
    with _open_picture(path, limits) as im:
        im.load()
        array = _picture_array(im)
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
