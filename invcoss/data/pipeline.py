"""Preprocessing configurations per modality and the pipeline that turns one file into samples.

The ``paper`` profile is Appendix A.1 of the paper:

=========  ====================================================================================
ct         resample to 1x1x1 mm, HU window [-1024, 1024] → [-1, 1], axial windows of 24 slices
           every 12, each resized to 16x192x192
mri        z-score per volume, axial windows of 16 slices every 8, resized to 16x192x192
xray       grey, resized to 224x224, replicated to 3 channels, in [0, 1]
pathology  contiguous 512x512 patches (at most 100 per file), each resized to 224x224, RGB in [0, 1]
=========  ====================================================================================

The ``quick`` profile is the same processing at the input sizes of the ``vit_nano`` preset
(3D 16x96x96, 2D 112x112), for CPUs. Every field is a parameter: ``get_config("ct", "paper",
size=(16, 128, 128))``.

Samples are channel-first float32: 3D ``(1, D, H, W)``, 2D ``(3, H, W)``. Non-finite voxels
(NaN, inf) are replaced by the volume's finite minimum / maximum before anything else.

A source is a NIfTI or picture file, or a DICOM series (a volume) or 2D DICOM image found by
:func:`~invcoss.data.cache.find_sources` (:mod:`invcoss.data.dicom`); a DICOM series goes through
the same steps as a NIfTI volume, its warnings (duplicates, uneven spacing) added to the file's.

A file that cannot make a meaningful sample raises :class:`~invcoss.data.ReadError` (kind
``no usable sample``) before its voxels are resampled: a single slice (a 2D image) for a 3D
modality, or a volume with fewer slices than one window after resampling (0.02 mm voxels collapse
to one voxel at 1 mm). A 4D series gives its first volume (``frames="first"``) or every volume
(``frames="all"``), with a warning either way; voxel spacing outside 0.1 to 10 mm is warned about
(a header in metres or microns).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from invcoss.configs import config_from_dict
from invcoss.data.dicom import DicomImage, DicomSeries, read_dicom_picture, read_dicom_series
from invcoss.data.readers import (
    DEFAULT_LIMITS,
    FAILED,
    OVER_LIMIT,
    UNUSABLE,
    Picture,
    ReadError,
    ReadLimits,
    Volume,
    VolumeHeader,
    picture_size,
    read_nifti,
    read_nifti_header,
    read_picture,
)
from invcoss.data.transforms import (
    Clip,
    Compose,
    FillNonFinite,
    GridPatches,
    IntensityWindow,
    ReplicateChannels,
    Resample,
    Resize,
    SlidingWindows,
    ToGrey,
    ZScore,
    resampled_shape,
)
from invcoss.modality import modality_names

# What a Preprocessor reads: a NIfTI or picture file, a DICOM series (a volume) or a 2D DICOM image.
Source = str | os.PathLike | DicomSeries | DicomImage
MODALITIES = modality_names()
PROFILES = ("paper", "quick")
VOLUME_MODALITIES = modality_names(ndim=3)
FRAMES = ("first", "all")
# Voxel spacing outside this range (mm) is warned about: real scans lie well inside it.
USUAL_SPACING = (0.1, 10.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """How one modality is turned into model inputs (see the module docstring for the profiles).

    Attributes:
        modality: one of ``ct``, ``mri``, ``xray``, ``pathology``.
        profile: the profile it came from (informative; the fields are what count).
        size: output spatial size, ``(D, H, W)`` for volumes, ``(H, W)`` for 2D.
        spacing: resample target in mm ``(D, H, W)`` before windowing, or None to keep the file's.
        window, stride: axial sliding window length and step in slices (volumes).
        cover_end: add a last window flush with the end when the regular ones leave slices out.
        a_min, a_max: intensity window mapped to [-1, 1] with clipping (CT), or None.
        zscore: standardise each volume to mean 0, std 1 (MRI).
        channels: output channels (1 for volumes, 3 for 2D models).
        grey: reduce a 2D image to grey before replicating it to ``channels`` (X-ray).
        patch: side of the contiguous patches cut from a 2D tile before resizing, or None.
        max_patches: at most this many patches per file (a fixed pseudo-random choice per file name).
    """

    modality: str
    profile: str
    size: tuple[int, ...]
    spacing: tuple[float, float, float] | None = None
    window: int | None = None
    stride: int | None = None
    cover_end: bool = False
    a_min: float | None = None
    a_max: float | None = None
    zscore: bool = False
    channels: int = 1
    grey: bool = False
    patch: int | None = None
    max_patches: int | None = None

    @property
    def ndim(self) -> int:
        """Spatial dimensions of a sample: 3 for volumes, 2 for pictures."""
        return len(self.size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, channel first: ``(1, D, H, W)`` or ``(3, H, W)``."""
        return (self.channels, *self.size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """The inverse of :meth:`to_dict` (:func:`invcoss.configs.config_from_dict`)."""
        return config_from_dict(cls, d)

    def digest(self) -> str:
        """A short hash of every field that changes the samples (cache validity)."""
        blob = json.dumps(self.to_dict() | {"profile": None}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _paper(modality: str) -> PreprocessConfig:
    if modality == "ct":
        return PreprocessConfig(
            "ct", "paper", (16, 192, 192), spacing=(1.0, 1.0, 1.0), window=24, stride=12,
            a_min=-1024.0, a_max=1024.0,
        )  # fmt: skip
    if modality == "mri":
        return PreprocessConfig("mri", "paper", (16, 192, 192), window=16, stride=8, zscore=True)
    if modality == "xray":
        return PreprocessConfig("xray", "paper", (224, 224), channels=3, grey=True)
    return PreprocessConfig("pathology", "paper", (224, 224), channels=3, patch=512, max_patches=100)


def get_config(modality: str, profile: str = "paper", **overrides) -> PreprocessConfig:
    """The preprocessing of ``modality`` under ``profile``, with any field overridden.

    Args:
        modality: ``ct``, ``mri``, ``xray`` or ``pathology``.
        profile: ``paper`` (Appendix A.1) or ``quick`` (vit_nano sizes: 3D 16x96x96, 2D 112x112).
        **overrides: any :class:`PreprocessConfig` field, e.g. ``size=(16, 128, 128)``.

    Raises:
        ValueError: unknown modality, profile or field, or a size of the wrong length.

    Example:
        >>> get_config("ct", "quick").size
        (16, 96, 96)
        >>> get_config("xray", "paper", size=(256, 256)).sample_shape
        (3, 256, 256)
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    cfg = _paper(modality)
    if profile == "quick":
        cfg = replace(cfg, profile="quick", size=(16, 96, 96) if cfg.ndim == 3 else (112, 112))
    names = {f.name for f in fields(PreprocessConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"get_config got unknown field(s) {unknown}; valid fields: {sorted(names)}")
    if "size" in overrides:
        overrides["size"] = tuple(int(s) for s in overrides["size"])
        want = 3 if modality in VOLUME_MODALITIES else 2
        if len(overrides["size"]) != want:
            raise ValueError(f"size for {modality} must have {want} entries, got {overrides['size']}")
    return replace(cfg, **overrides)


def config_for_input(
    modality: str, input_size: tuple[int, ...], channels: int | None = None
) -> PreprocessConfig:
    """The paper's processing of ``modality`` resized to a model's ``input_size`` (profile named after it)."""
    input_size = tuple(int(s) for s in input_size)
    quick = get_config(modality, "quick")
    profile = "quick" if quick.size == input_size else "paper"
    kw = {"size": input_size}
    if channels is not None:
        kw["channels"] = channels
    return get_config(modality, profile, **kw)


@dataclass
class Sample:
    """One preprocessed sample of a file.

    ``array`` is the channel-first float32 model input; ``index`` numbers the samples of the file;
    ``position`` is the window's first slice (volumes) or the patch's ``(top, left)`` (2D);
    ``spacing`` is the physical size in mm of one output voxel (volumes; None for 2D);
    ``frame`` the volume of a 4D series it comes from (0 otherwise).
    """

    array: np.ndarray
    index: int
    position: tuple[int, ...]
    spacing: tuple[float, ...] | None
    frame: int = 0


@dataclass
class FileResult:
    """Everything :meth:`Preprocessor.run` makes of one file.

    ``samples`` in file order; ``warnings`` for a person (4D series, unusual spacing); ``shape``
    of the source, ``(D, H, W)`` of one volume or ``(C, H, W)``; ``spacing`` in mm (volumes;
    None for 2D); ``frames`` the volumes the file holds (1 unless a 4D series).
    """

    samples: list[Sample]
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    frames: int = 1
    warnings: list[str] = field(default_factory=list)


@contextmanager
def one_file(path: str | os.PathLike) -> Iterator[None]:
    """Turn any error raised while handling ``path`` into a :class:`ReadError` naming it.

    A folder scan then has one error type to catch per file, whatever failed (a resample too large
    for memory, a bug in a decoder); :class:`ReadError` passes through unchanged.
    """
    try:
        yield
    except ReadError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {text[0][:300] if text else ''}"
        raise ReadError(path, f"failed while preprocessing ({detail})", FAILED) from e


class Preprocessor:
    """Turns one file into samples under a :class:`PreprocessConfig` (a composition of transforms).

    Args:
        config: the processing.
        limits: :class:`~invcoss.data.ReadLimits` checked from each file's header (also the voxels
            after resampling).
        frames: of a 4D series, ``"first"`` volume only or ``"all"`` volumes, each a sample source.

    Every error about one file is a :class:`~invcoss.data.ReadError` naming it (see
    :func:`one_file`).

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> pre = Preprocessor(get_config("mri", "quick", window=4, stride=2))
        >>> samples = pre(os.path.join(data_path, "anatomical.nii"))
        >>> len(samples), samples[0].array.shape
        (11, (1, 16, 96, 96))
    """

    def __init__(
        self, config: PreprocessConfig, limits: ReadLimits = DEFAULT_LIMITS, frames: str = "first"
    ) -> None:
        if frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
        if not isinstance(limits, ReadLimits):
            raise TypeError(f"limits must be a ReadLimits, got {type(limits).__name__}")
        self.config = c = config
        self.limits, self.frames = limits, frames
        if c.ndim == 3:
            steps = []
            if c.a_min is not None and c.a_max is not None:
                steps.append(IntensityWindow(c.a_min, c.a_max))
            if c.zscore:
                steps.append(ZScore())
            self.resample = Resample(c.spacing) if c.spacing is not None else None
            self.intensity = Compose(steps)
            self.windows = SlidingWindows(
                c.window or c.size[0], c.stride or c.window or c.size[0], c.cover_end
            )
            self.resize = Resize(c.size)
        else:
            self.patches = GridPatches(c.patch) if c.patch else None
            head = [ToGrey()] if c.grey else []
            self.to_channels = Compose([*head, ReplicateChannels(c.channels)])
            self.resize = Compose([Resize(c.size), Clip(0.0, 1.0)])

    def read(self, path: Source) -> Volume | Picture:
        """Read ``path`` with the reader of this modality (:class:`ReadError` if it cannot)."""
        if isinstance(path, DicomSeries):
            return read_dicom_series(path, self.limits)
        if isinstance(path, DicomImage):
            return read_dicom_picture(path, self.limits)
        if self.config.ndim == 3:
            return read_nifti(path, limits=self.limits)
        return read_picture(path, self.limits)

    def _header(self, source: Source) -> VolumeHeader:
        if isinstance(source, DicomSeries):
            return source.header
        return read_nifti_header(source, self.limits)

    def count(self, path: Source) -> int:
        """Number of samples ``path`` gives, from its header only (no voxel data decoded)."""
        return len(self.positions(path))

    def positions(self, path: Source) -> list:
        """Window starts (volumes; repeated per frame with ``frames="all"``) or patch corners (2D),
        from the header only.

        Raises:
            ReadError: the header is unreadable, breaks the limits, or gives no usable sample.
        """
        where = source_path(path)
        with one_file(where):
            if self.config.ndim == 3:
                if isinstance(path, DicomImage):
                    raise ReadError(
                        where, f"a single 2D image, but {self.config.modality} needs a volume", UNUSABLE
                    )
                header = self._header(path)
                target = self._check_volume(where, header.shape, header.spacing)
                starts = [(s,) for s in self.windows.positions(target[0])]
                return starts * (header.frames if self.frames == "all" else 1)
            if isinstance(path, DicomImage):
                height, width = path.rows, path.cols
            else:
                height, width = picture_size(path, self.limits)
            if self.patches is None:
                return [(0, 0)]
            return self._choose(where, self.patches.positions(height, width))

    def _check_volume(
        self, path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]
    ) -> tuple[int, ...]:
        """The shape after resampling, or :class:`ReadError` when no meaningful sample can come out."""
        c = self.config
        dims = "x".join(map(str, shape))
        if min(shape) == 1:
            raise ReadError(
                path, f"a single slice ({dims} voxels), but {c.modality} needs a volume", UNUSABLE
            )
        target = tuple(shape) if c.spacing is None else resampled_shape(shape, spacing, c.spacing)
        where = ""
        if c.spacing is not None:
            where = f" after resampling {dims} voxels of {_mm(spacing)} mm to {_mm(c.spacing)} mm"
            voxels = math.prod(target)
            if voxels > self.limits.max_voxels:
                raise ReadError(
                    path,
                    f"{'x'.join(map(str, target))} = {voxels:,} voxels{where}, more than the limit of "
                    f"{self.limits.max_voxels:,} (raise it with --max-voxels / ReadLimits.max_voxels)",
                    OVER_LIMIT,
                )
        if target[0] < self.windows.size:
            raise ReadError(
                path,
                f"{'x'.join(map(str, target))} voxels{where}: fewer than one window of "
                f"{self.windows.size} slices ({shape[0] * spacing[0]:.3g} mm along the axial axis)",
                UNUSABLE,
            )
        if min(target[1:]) < 2:
            raise ReadError(
                path, f"{'x'.join(map(str, target))} voxels{where}: under 2 voxels across in plane", UNUSABLE
            )
        return target

    def run(self, path: Source) -> FileResult:
        """All samples of the file ``path`` (or DICOM series or image), with its geometry and warnings.

        Raises:
            ReadError: anything wrong with the file (unreadable, over a limit, no usable sample,
                any failure while preprocessing it).
        """
        if isinstance(path, str | os.PathLike):
            path = Path(path)
        where = source_path(path)
        with one_file(where):
            if self.config.ndim == 2:
                picture = self.read(path)
                return FileResult(self._picture_samples(picture), tuple(picture.array.shape))
            if isinstance(path, DicomImage):
                raise ReadError(
                    where, f"a single 2D image, but {self.config.modality} needs a volume", UNUSABLE
                )
            header = self._header(path)
            warnings = list(path.warnings) if isinstance(path, DicomSeries) else []
            lo, hi = USUAL_SPACING
            if not all(lo <= s <= hi for s in header.spacing):
                warnings.append(
                    f"unusual voxel spacing {_mm(header.spacing)} mm (outside {lo} to {hi} mm): check the header"
                )
            self._check_volume(where, header.shape, header.spacing)
            frames = header.frames if self.frames == "all" else 1
            if header.frames > 1 and self.frames == "first":
                warnings.append(
                    f"a 4D series of {header.frames} volumes: only the first is used "
                    "(--frames all / frames='all' makes every volume a sample source)"
                )
            elif header.frames > 1:
                warnings.append(f"a 4D series of {header.frames} volumes: each is preprocessed as a volume")
            samples: list[Sample] = []
            for f in range(frames):
                volume = (
                    self.read(path) if isinstance(path, DicomSeries) else read_nifti(path, f, self.limits)
                )
                for s in self._volume_samples(volume):
                    samples.append(replace(s, index=len(samples), frame=f))
            return FileResult(samples, header.shape, header.spacing, header.frames, warnings)

    def _choose(self, path: Path, positions: list) -> list:
        k = self.config.max_patches
        if k is None or len(positions) <= k:
            return positions
        # A fixed choice per file name, so a re-run and a dataset read of the same folder agree.
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        keep = np.sort(rng.choice(len(positions), size=k, replace=False))
        return [positions[i] for i in keep]

    def __call__(self, source: Source | Volume | Picture) -> list[Sample]:
        """All samples of a file or DICOM series (see :meth:`run`) or of an image already read."""
        if isinstance(source, str | os.PathLike | DicomSeries | DicomImage):
            return self.run(source).samples
        with one_file(source.path or "<image>"):
            if self.config.ndim == 3:
                return self._volume_samples(source)
            return self._picture_samples(source)

    def _volume_samples(self, volume: Volume) -> list[Sample]:
        self._check_volume(volume.path or Path("<volume>"), volume.array.shape, volume.spacing)
        if not np.isfinite(volume.array).any():
            raise ReadError(
                volume.path or "<volume>", "no finite voxel value (all NaN or infinite)", UNUSABLE
            )
        volume = replace(volume, array=FillNonFinite()(volume.array))
        if self.resample is not None:
            volume = self.resample(volume)
        array = self.intensity(volume.array)
        starts = self.windows.positions(array.shape[0])
        spacing = self._window_spacing(array.shape, volume.spacing)
        return [
            Sample(self.resize(w)[None], i, (s,), spacing)
            for i, (s, w) in enumerate(zip(starts, self.windows(array)))
        ]

    def _window_spacing(self, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[float, ...]:
        """The spacing of one output voxel of a volume of ``shape`` and ``spacing`` (after resampling)."""
        out_d, out_h, out_w = self.config.size
        sd, sh, sw = spacing
        # Every window holds windows.size slices (short volumes are padded), resized to out_d.
        return (self.windows.size * sd / out_d, shape[1] * sh / out_h, shape[2] * sw / out_w)

    def sample_spacing(self, path: Source) -> tuple[float, ...] | None:
        """The ``spacing`` of the samples of ``path`` from its header only (None for 2D), as
        :meth:`run` gives them.

        Raises:
            ReadError: as :meth:`positions`.
        """
        if self.config.ndim == 2:
            return None
        where = source_path(path)
        with one_file(where):
            header = self._header(path)
            shape = self._check_volume(where, header.shape, header.spacing)
        spacing = tuple(header.spacing)
        if tuple(shape) != tuple(header.shape):  # as Resample: the extent kept over the new shape
            spacing = tuple(n * s / m for n, s, m in zip(header.shape, header.spacing, shape))
        return self._window_spacing(shape, spacing)

    def _picture_samples(self, picture: Picture) -> list[Sample]:
        array = picture.array
        if self.patches is None:
            return [Sample(self.resize(self.to_channels(array)), 0, (0, 0), None)]
        if array.shape[0] == 1:
            array = np.repeat(array, 3, axis=0)
        positions = self.patches.positions(array.shape[1], array.shape[2])
        if picture.path is not None:
            positions = self._choose(picture.path, positions)
        p = self.patches.size
        return [
            Sample(
                self.resize(self.to_channels(np.ascontiguousarray(array[:, r : r + p, q : q + p]))),
                i,
                (r, q),
                None,
            )
            for i, (r, q) in enumerate(positions)
        ]


def source_path(source: Source) -> Path:
    """The path that names a source in messages: the file, or a DICOM series' folder and UID."""
    if isinstance(source, DicomSeries):
        return source.label
    if isinstance(source, DicomImage):
        return source.path
    return Path(source)


def _mm(spacing) -> str:
    return "x".join(f"{float(s):g}" for s in spacing)
