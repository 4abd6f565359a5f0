"""Deterministic procedural phantoms: CT, MRI-like, X-ray-like and pathology-like images from a seed.

They exist so every command runs offline on files that go through the same readers as a user's:
:func:`write_phantoms` writes real NIfTI (CT, MRI) and PNG (X-ray, pathology) files. The same
``(seed, index)`` always gives the same bytes.

- CT (:func:`ct_phantom`): a chest in Hounsfield units — air -1000 outside an elliptical body,
  subcutaneous fat about -100, soft tissue about 40, a heart, two lungs about -850 with faint
  vessels, a spine (cortical rim, cancellous core, discs, spinal canal) and ribs at a regular
  pitch, plus Gaussian noise. Arrays are ``(D, H, W)``: D inferior → superior, H posterior →
  anterior, W left → right (the axis order of :func:`invcoss.data.read_nifti`).
- MRI (:func:`mri_phantom`): a T1-like head — scalp, skull, cerebrospinal fluid, folded grey
  matter, white matter, ventricles — with a smooth bias field and Rician noise.
- X-ray (:func:`xray_phantom`): a frontal projection of a CT phantom (bones bright, lungs dark).
- Pathology (:func:`pathology_phantom`): an H&E-like RGB tile — pink stroma, glands with white
  lumens lined by nuclei, scattered purple nuclei.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from invcoss.data.atomic import atomic_write_bytes
from invcoss.data.pipeline import PreprocessConfig, Preprocessor, get_config
from invcoss.data.transforms import resampled_shape, resize_array
from invcoss.data.writers import nifti_bytes, png_bytes
from invcoss.modality import modality_names

PHANTOM_MODALITIES = modality_names()
# The anatomy label of every sample the preprocessing cuts from a phantom (:func:`phantom_labels`).
PHANTOM_LABELS = {
    "ct": ("upper_chest", "lower_chest"),
    "mri": ("ventricles", "no_ventricles"),
    "xray": ("low_lung_bases", "high_lung_bases"),
}
DEFAULT_SIZES = {"ct": (64, 160, 160), "mri": (48, 128, 128), "xray": (256, 256), "pathology": (512, 512)}
DEFAULT_SPACING = {"ct": (2.5, 1.6, 1.6), "mri": (1.5, 1.25, 1.25)}
_MODALITY_CODE = {m: i for i, m in enumerate(PHANTOM_MODALITIES)}


def _rng(seed: int, index: int, modality: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), _MODALITY_CODE[modality]])


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise that varies over about ``shape / cells`` voxels."""
    coarse = rng.standard_normal((1, 1, *(max(2, cells) for _ in shape))).astype(np.float32)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = F.interpolate(torch.from_numpy(coarse), size=tuple(shape), mode=mode, align_corners=True)[
        0, 0
    ].numpy()
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Broadcastable coordinates in mm, centred on the volume, one per axis."""
    out = []
    for ax, (n, s) in enumerate(zip(shape, spacing)):
        view = [1] * len(shape)
        view[ax] = n
        out.append(((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape(view))
    return out


def ct_phantom(
    seed: int = 0,
    index: int = 0,
    shape: Sequence[int] = (64, 160, 160),
    spacing: Sequence[float] = (2.5, 1.6, 1.6),
) -> np.ndarray:
    """A chest CT volume in Hounsfield units, ``(D, H, W)`` float32 (see the module docstring).

    Anatomy is laid out in millimetres relative to the field of view, so any shape and spacing
    give a plausible chest; ``(seed, index)`` picks the body size, organ sizes, noise and so on.

    Example:
        >>> v = ct_phantom(0, shape=(24, 64, 64), spacing=(4.0, 4.0, 4.0))
        >>> v.shape, bool(v.min() < -900), bool(v.max() > 300)
        ((24, 64, 64), True, True)
    """
    return _ct(seed, index, shape, spacing)[0]


def _chest_draws(rng: np.random.Generator) -> dict[str, float]:
    """The first draws of a CT phantom, in order: body size, fat, tissue offsets, lung extent.

    Apart so that the anatomy labels read them without synthesising the volume.
    """
    d = {"width": rng.uniform(0.40, 0.46), "width_phase": rng.uniform(0, 6.28)}
    d["depth"] = rng.uniform(0.27, 0.33)
    d["fat_mm"] = rng.uniform(6.0, 18.0)
    d["fat_hu"], d["tissue_hu"] = rng.normal(0, 8), rng.normal(0, 5)
    d["lung_top"], d["lung_bottom"] = rng.uniform(0.75, 1.1), rng.uniform(-0.75, -0.35)
    return d


def _ct(
    seed: int, index: int, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, dict[str, object]]:
    """:func:`ct_phantom` and its anatomy: ``upper`` ``(D,)`` bool (the slice lies above the middle
    of the lungs' craniocaudal extent) and ``lung_bottom`` (the lung bases, from -1 at the inferior
    edge of the volume to 1 at the superior edge)."""
    rng = _rng(seed, index, "ct")
    z, y, x = _grid(shape, spacing)
    fov = min(shape[1] * spacing[1], shape[2] * spacing[2])
    zext = shape[0] * spacing[0]
    zn = z / (zext / 2)  # -1 (inferior) .. 1 (superior)

    d = _chest_draws(rng)
    ax = fov * d["width"] * (1 + 0.04 * np.sin(2.1 * zn + d["width_phase"]))
    ay = fov * d["depth"] * (1 + 0.03 * np.cos(1.7 * zn))
    body = (x / ax) ** 2 + (y / ay) ** 2
    fat_mm = d["fat_mm"]
    ix, iy = ax - fat_mm, ay - fat_mm
    inner = (x / ix) ** 2 + (y / iy) ** 2

    hu = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), -1000.0, dtype=np.float32)
    hu[body <= 1] = -100.0 + d["fat_hu"]
    hu[inner <= 1] = 40.0 + d["tissue_hu"]

    # Lungs in the upper part of the volume, left and right of the mediastinum.
    lung_top, lung_bottom = d["lung_top"], d["lung_bottom"]
    zc, zr = (lung_top + lung_bottom) / 2, (lung_top - lung_bottom) / 2
    lungs = np.zeros(hu.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * ix * rng.uniform(0.42, 0.50)
        rx, ry = ix * rng.uniform(0.30, 0.36), iy * rng.uniform(0.62, 0.72)
        lungs |= ((x - cx) / rx) ** 2 + ((y + 0.08 * iy) / ry) ** 2 + ((zn - zc) / zr) ** 2 <= 1
    vessels = np.abs(_smooth_noise(rng, hu.shape, 28)) < 0.08  # thin branching iso-surfaces
    hu[lungs] = -850.0
    hu[lungs & vessels] = -500.0

    heart = (
        ((x + 0.12 * ix) / (0.34 * ix)) ** 2
        + ((y - 0.30 * iy) / (0.42 * iy)) ** 2
        + ((zn - zc + 0.25) / 0.45) ** 2
    )
    hu[heart <= 1] = 50.0
    liver = (
        ((x - 0.35 * ix) / (0.55 * ix)) ** 2 + ((y - 0.05 * iy) / (0.75 * iy)) ** 2 + ((zn + 1.1) / 0.5) ** 2
    )
    hu[(liver <= 1) & ~lungs] = 60.0

    # Spine: vertebral bodies separated by discs, with the canal and the posterior arch behind.
    vr = fov * rng.uniform(0.045, 0.055)
    vy = -iy + 2.2 * vr + 8.0
    r_body = np.sqrt(x**2 + (y - vy) ** 2)
    pitch = rng.uniform(22.0, 28.0)
    disc = np.mod(z + rng.uniform(0, pitch), pitch) < 5.0
    hu[(r_body <= vr) & disc] = 80.0
    hu[(r_body <= vr) & ~disc] = 250.0
    hu[(r_body <= vr) & (r_body > vr - 2.5) & ~disc] = 700.0
    r_canal = np.sqrt(x**2 + (y - vy + vr + 0.45 * vr) ** 2)
    hu[(r_canal <= 0.85 * vr) & (r_canal > 0.45 * vr)] = 600.0
    hu[r_canal <= 0.45 * vr] = 15.0

    # Ribs: a ring segment just inside the fat at every rib level of the thorax, open anteriorly.
    rib_pitch = rng.uniform(20.0, 26.0)
    rib_level = (
        (np.mod(z + rng.uniform(0, rib_pitch), rib_pitch) < 9.0) & (zn > lung_bottom) & (zn < lung_top)
    )
    rib_ring = (inner <= 1) & (((x / (ix - 9.0)) ** 2 + (y / (iy - 9.0)) ** 2) > 1)
    posterior = y < 0.55 * iy
    hu[rib_level & rib_ring & posterior] = 650.0

    hu += rng.normal(0, rng.uniform(8.0, 18.0), size=hu.shape).astype(np.float32)
    anatomy = {"upper": zn.reshape(-1) >= zc, "lung_bottom": float(lung_bottom)}
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32), anatomy


def mri_phantom(
    seed: int = 0,
    index: int = 0,
    shape: Sequence[int] = (48, 128, 128),
    spacing: Sequence[float] = (1.5, 1.25, 1.25),
) -> np.ndarray:
    """A T1-like head MRI volume ``(D, H, W)`` float32 with arbitrary positive units (about 0..1000).

    Example:
        >>> v = mri_phantom(1, shape=(16, 48, 48))
        >>> v.shape, bool(v.min() >= 0)
        ((16, 48, 48), True)
    """
    return _mri(seed, index, shape, spacing)[0]


def _mri(
    seed: int, index: int, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, dict[str, object]]:
    """:func:`mri_phantom` and its anatomy: ``ventricles`` ``(D,)`` bool (the slice cuts one)."""
    rng = _rng(seed, index, "mri")
    z, y, x = _grid(shape, spacing)
    fov = min(shape[1] * spacing[1], shape[2] * spacing[2])
    a = np.array(
        [
            shape[0] * spacing[0] * rng.uniform(0.55, 0.7),
            fov * rng.uniform(0.40, 0.46),
            fov * rng.uniform(0.34, 0.40),
        ]
    )
    r = np.sqrt((z / a[0]) ** 2 + (y / a[1]) ** 2 + (x / a[2]) ** 2)
    theta = np.arctan2(y, x)
    fold = 0.035 * np.sin(9 * theta + rng.uniform(0, 6.28)) + 0.02 * _smooth_noise(rng, r.shape, 10)

    img = np.zeros(r.shape, dtype=np.float32)
    ventricles = np.zeros(shape[0], dtype=bool)
    img[r <= 1.0] = 800.0  # scalp
    img[r <= 0.93] = 90.0  # skull
    img[r <= 0.86] = 180.0  # cerebrospinal fluid
    img[r <= 0.82 + fold] = 520.0  # grey matter
    img[r <= 0.62 + fold] = 720.0  # white matter
    for side in (-1.0, 1.0):
        vent = (
            (z / (0.35 * a[0])) ** 2
            + ((y - 0.05 * a[1]) / (0.30 * a[1])) ** 2
            + ((x - side * 0.11 * a[2]) / (0.07 * a[2])) ** 2
        )
        img[vent <= 1] = 170.0
        ventricles |= (vent <= 1).any(axis=(1, 2))

    bias = 1.0 + 0.12 * _smooth_noise(rng, r.shape, 3)
    sigma = rng.uniform(10.0, 25.0)
    n1 = rng.normal(0, sigma, size=img.shape)
    n2 = rng.normal(0, sigma, size=img.shape)
    return np.sqrt((img * bias + n1) ** 2 + n2**2).astype(np.float32), {"ventricles": ventricles}


def xray_phantom(seed: int = 0, index: int = 0, size: Sequence[int] = (256, 256)) -> np.ndarray:
    """A frontal chest radiograph ``(1, H, W)`` float32 in [0, 1]: the AP projection of a CT phantom.

    Attenuation (from HU, water = 0.02/mm) is summed along the anterior-posterior axis, scaled to
    [0, 1] (bright = more attenuation, as on film) and flipped so the head is at the top.

    Example:
        >>> img = xray_phantom(0, size=(64, 64))
        >>> img.shape, 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        ((1, 64, 64), True)
    """
    return _xray(seed, index, size)[0]


def _xray(seed: int, index: int, size: Sequence[int]) -> tuple[np.ndarray, dict[str, object]]:
    """:func:`xray_phantom` and the anatomy of the CT phantom it projects."""
    rng = _rng(seed, index, "xray")
    spacing = (3.0, 3.0, 3.0)
    ct, anatomy = _ct(int(rng.integers(2**31)), index, shape=(110, 120, 120), spacing=spacing)
    mu = np.clip(ct + 1000.0, 0.0, None) * (0.02 / 1000.0)
    proj = mu.sum(axis=1) * spacing[1]  # (D, W)
    proj = proj[::-1] / max(float(np.percentile(proj, 99.7)), 1e-6)
    img = np.clip(proj, 0.0, 1.0) ** rng.uniform(0.8, 1.2)
    img = resize_array(np.ascontiguousarray(img, dtype=np.float32)[None], size)
    img += rng.normal(0, 0.01, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), anatomy


def pathology_phantom(seed: int = 0, index: int = 0, size: Sequence[int] = (512, 512)) -> np.ndarray:
    """An H&E-like RGB tile ``(3, H, W)`` float32 in [0, 1].

    Example:
        >>> tile = pathology_phantom(0, size=(64, 64))
        >>> tile.shape
        (3, 64, 64)
    """
    rng = _rng(seed, index, "pathology")
    h, w = int(size[0]), int(size[1])
    stroma = np.array([0.92, 0.66, 0.78], dtype=np.float32)[:, None, None]
    texture = _smooth_noise(rng, (h, w), max(4, h // 24))
    img = np.clip(stroma * (1 + 0.06 * texture[None]), 0, 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    nucleus = np.array([0.35, 0.20, 0.55], dtype=np.float32)
    lumen = np.array([0.97, 0.95, 0.97], dtype=np.float32)

    def stamp(cy: float, cx: float, ry: float, rx: float, colour: np.ndarray, angle: float = 0.0) -> None:
        r = int(max(ry, rx)) + 2
        y0, y1, x0, x1 = (
            max(0, int(cy) - r),
            min(h, int(cy) + r + 1),
            max(0, int(cx) - r),
            min(w, int(cx) + r + 1),
        )
        if y0 >= y1 or x0 >= x1:
            return
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        c, s = np.cos(angle), np.sin(angle)
        inside = ((c * dy + s * dx) / ry) ** 2 + ((-s * dy + c * dx) / rx) ** 2 <= 1
        img[:, y0:y1, x0:x1] = np.where(inside[None], colour[:, None, None], img[:, y0:y1, x0:x1])

    scale = min(h, w) / 512.0
    for _ in range(int(rng.integers(150, 300) * scale * scale) + 5):
        stamp(rng.uniform(0, h), rng.uniform(0, w), max(1.5, rng.uniform(3, 6) * scale),
              max(1.0, rng.uniform(2, 4) * scale), nucleus * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi))  # fmt: skip
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(30, 70) * scale, rng.uniform(30, 70) * scale
        stamp(cy, cx, ry + 10 * scale, rx + 10 * scale, np.array([0.80, 0.55, 0.75], dtype=np.float32))
        stamp(cy, cx, ry, rx, lumen)
        for t in np.linspace(0, 2 * np.pi, int(20 + 30 * scale), endpoint=False):
            stamp(cy + (ry + 5 * scale) * np.sin(t), cx + (rx + 5 * scale) * np.cos(t),
                  max(1.5, 4 * scale), max(1.0, 2.5 * scale), nucleus * rng.uniform(0.85, 1.15), t)  # fmt: skip
    img = img + rng.normal(0, 0.015, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def write_phantoms(
    out: str | os.PathLike,
    modality: str,
    count: int,
    seed: int = 0,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    on_written=None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``count`` phantoms of ``modality`` into folder ``out`` as ``<modality>_<index>.nii.gz|.png``.

    Phantom ``i`` depends only on ``(seed, i)``, so a larger count extends a smaller one. Each file
    is written atomically. A file of that name already holding the same bytes is kept as it is (a
    re-run regenerates nothing new); one holding other bytes (another seed, size or spacing, or a
    file of the user's) is a :class:`PhantomExistsError` unless ``overwrite``. The files before it
    were new or unchanged, so nothing is lost.

    Args:
        out: target folder (created).
        modality: ``ct``, ``mri``, ``xray`` or ``pathology``.
        count: number of files (>= 1).
        seed: base seed.
        size: ``(D, H, W)`` for CT/MRI, ``(H, W)`` for X-ray/pathology (defaults in ``DEFAULT_SIZES``).
        spacing: voxel spacing in mm for CT/MRI (defaults in ``DEFAULT_SPACING``).
        on_written: optional callable receiving each written path (progress reporting).
        overwrite: replace a file of the same name that holds other bytes.

    Returns:
        The written paths in index order.

    Raises:
        ValueError: unknown modality, count < 1, or a size/spacing of the wrong length.
        PhantomExistsError: (a ValueError) a file of a phantom's name holds other bytes and
            ``overwrite`` is false.

    Example:
        >>> import tempfile
        >>> paths = write_phantoms(tempfile.mkdtemp(), "xray", 2, size=(32, 32))
        >>> [p.name for p in paths]
        ['xray_0000.png', 'xray_0001.png']
    """
    if modality not in PHANTOM_MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(PHANTOM_MODALITIES)}, got {modality!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    volumetric = modality in DEFAULT_SPACING
    size = tuple(int(s) for s in (size or DEFAULT_SIZES[modality]))
    want = 3 if volumetric else 2
    if len(size) != want or min(size) < 1:
        raise ValueError(f"size for {modality} phantoms must be {want} positive integers, got {size}")
    if volumetric:
        spacing = tuple(float(s) for s in (spacing or DEFAULT_SPACING[modality]))
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive values in mm, got {spacing}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = out / phantom_name(modality, i)
        if modality == "ct":
            blob = nifti_bytes(np.round(ct_phantom(seed, i, size, spacing)), spacing, np.int16)
        elif modality == "mri":
            blob = nifti_bytes(mri_phantom(seed, i, size, spacing), spacing, np.float32)
        elif modality == "xray":
            blob = png_bytes(xray_phantom(seed, i, size))
        else:
            blob = png_bytes(pathology_phantom(seed, i, size))
        if not _holds(name, blob):
            if name.exists() and (not overwrite or name.is_dir()):
                raise PhantomExistsError(name)
            atomic_write_bytes(name, blob)
        paths.append(name)
        if on_written is not None:
            on_written(name)
    return paths


class PhantomExistsError(ValueError):
    """A file of a phantom's name holds other bytes (``path``); ``overwrite`` replaces it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path} exists and is not the phantom of that name; pass overwrite=True (--overwrite) to "
            "replace it, or choose another folder"
        )


def _holds(path: Path, blob: bytes) -> bool:
    """Whether the file ``path`` exists and holds exactly ``blob``."""
    try:
        return path.is_file() and path.stat().st_size == len(blob) and path.read_bytes() == blob
    except OSError:
        return False


def phantom_name(modality: str, index: int) -> str:
    """The file name :func:`write_phantoms` gives phantom ``index`` of ``modality``."""
    return f"{modality}_{index:04d}" + (".nii.gz" if modality in DEFAULT_SPACING else ".png")


def _window_fractions(per_slice: np.ndarray, slice_mm: float, config: PreprocessConfig) -> list[float]:
    """Per window the preprocessing cuts, the fraction of the phantom's slices in it that are True.

    Mirrors :class:`invcoss.data.Preprocessor`: resample along D to ``config.spacing`` (the
    physical extent is kept, voxel edges map onto voxel edges), then windows of ``window`` slices
    every ``stride``. A phantom slice is in a window when its centre is.
    """
    depth = len(per_slice)
    windows = Preprocessor(config).windows
    resampled = (
        depth if config.spacing is None else resampled_shape((depth,), (slice_mm,), config.spacing[:1])[0]
    )
    step = depth * slice_mm / resampled  # mm per resampled slice
    centres = (np.arange(depth) + 0.5) * slice_mm
    out = []
    for start in windows.positions(resampled):
        inside = (centres >= start * step) & (centres < (start + windows.size) * step)
        out.append(float(per_slice[inside].mean()) if inside.any() else 0.0)
    return out


def phantom_labels(
    modality: str,
    seed: int = 0,
    index: int = 0,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    config: PreprocessConfig | None = None,
) -> list[str]:
    """The anatomy label of every sample the preprocessing cuts from phantom ``(seed, index)``.

    The generator knows the anatomy it draws, so the labels are exact and need no annotation:

    - ``ct``, per window (slice level): ``upper_chest`` when at least half of the phantom's slices
      in the window lie above the middle of the lungs' craniocaudal extent (lung apices, upper
      ribs), else ``lower_chest`` (lung bases, heart, liver). Lung presence itself is no usable
      label: the lungs fill about two thirds of the windows completely;
    - ``mri``, per window: ``ventricles`` when at least half of its slices cut a lateral
      ventricle, else ``no_ventricles`` (the vertex and the skull base);
    - ``xray``, per image (the level of the diaphragm): ``low_lung_bases`` when the lung bases of
      the projected chest lie in the lower half of the range the generator draws them from (more
      than 55% of the half-height below the centre), else ``high_lung_bases``; an even split by
      construction.

    Args:
        modality: ``ct``, ``mri`` or ``xray`` (``PHANTOM_LABELS``).
        seed, index, size, spacing: as given to :func:`write_phantoms`.
        config: the preprocessing whose windows are labelled (CT, MRI; default: the ``paper``
            profile's windows, which the ``quick`` profile shares). Unused for X-ray.

    Returns:
        One label per sample, in the order :class:`invcoss.data.Preprocessor` cuts them.

    Raises:
        ValueError: a modality without labels, or a config of another modality.

    Example:
        >>> phantom_labels("ct", 0, 0, size=(24, 48, 48))
        ['lower_chest', 'lower_chest', 'lower_chest', 'upper_chest']
        >>> phantom_labels("xray", 0, 1, size=(32, 32))
        ['high_lung_bases']
    """
    if modality not in PHANTOM_LABELS:
        raise ValueError(f"phantom labels exist for {', '.join(PHANTOM_LABELS)}, got {modality!r}")
    if config is not None and config.modality != modality:
        raise ValueError(f"config is for {config.modality}, not {modality}")
    size = tuple(int(s) for s in (size or DEFAULT_SIZES[modality]))
    positive, negative = PHANTOM_LABELS[modality]
    if modality == "xray":
        # The draws of the CT phantom that _xray projects, without synthesising it.
        ct_seed = int(_rng(seed, index, "xray").integers(2**31))
        lung_bottom = _chest_draws(_rng(ct_seed, index, "ct"))["lung_bottom"]
        return [positive if lung_bottom < -0.55 else negative]
    spacing = tuple(float(s) for s in (spacing or DEFAULT_SPACING[modality]))
    config = config or get_config(modality, "paper")
    if modality == "ct":
        per_slice = _ct(seed, index, size, spacing)[1]["upper"]
    else:
        per_slice = _mri(seed, index, size, spacing)[1]["ventricles"]
    return [positive if f >= 0.5 else negative for f in _window_fractions(per_slice, spacing[0], config)]


def phantom_label_rows(
    folder: str | os.PathLike,
    modality: str,
    count: int,
    seed: int = 0,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    config: PreprocessConfig | None = None,
) -> list[tuple[Path, int, str]]:
    """``(file, sample index, label)`` for every sample of the phantoms :func:`write_phantoms` wrote.

    The same arguments as the :func:`write_phantoms` call that wrote ``folder``; the rows are the
    ``file,sample,label`` columns of a labelled CSV (:mod:`invcoss.continual.probe`).

    Example:
        >>> rows = phantom_label_rows("scans", "ct", 2, size=(24, 48, 48))
        >>> [(p.name, k, label) for p, k, label in rows][:2]
        [('ct_0000.nii.gz', 0, 'lower_chest'), ('ct_0000.nii.gz', 1, 'lower_chest')]
    """
    folder = Path(folder)
    rows = []
    for i in range(count):
        labels = phantom_labels(modality, seed, i, size, spacing, config)
        rows.extend((folder / phantom_name(modality, i), k, label) for k, label in enumerate(labels))
    return rows
