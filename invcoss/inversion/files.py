"""The files of an inversion run: samples, manifest, preview, resume state (the run: :mod:`.run`).

Layout of an output folder::

    manifest.json                 config, model and statistics identity, per-batch losses and
                                  timings, the quality report; rewritten after every batch
    preview.png                   central axial slices (3D; radiological orientation, marked
                                  A/P/R/L) or images (2D) of the first 16 samples
    samples/<modality>_00000.nii.gz   3D, format "nifti" (default): float32 NIfTI, (D, H, W), the
                                  spacing in the affine (:func:`written_spacing`: the config's,
                                  the statistics' data's, a reference cache's or
                                  :func:`nominal_spacing`), RAS+ orientation (qform and sform)
    samples/<modality>_00000.npy      3D "npy": float32 (1, D, H, W); 2D "npy" (default): float32
                                  (C, H, W), what the model takes (PNG would round)
    png/<modality>_00000.png          2D "npy": an 8-bit copy for viewing
    samples/<modality>_00000.png      2D "png": the 8-bit image only (values rounded to 1/255)
    samples/<modality>_00000/0000.dcm 3D "dicom" (needs pydicom): a synthetic DICOM series per
                                  sample (:func:`invcoss.data.writers.write_dicom_series`), values
                                  as NIfTI's, stored to within 1/32 HU
    state/after_batch_00003.safetensors   what the next batch needs (generator, Adam moments,
                                  repulsive pool); removed when the run completes

``.npy`` and PNG values are in the model's input space (see :data:`invcoss.modality.INPUT_SPACES`;
the manifest's ``intensity`` says what they mean). NIfTI volumes hold ``file_scale`` x the model
input (:attr:`invcoss.modality.InputSpace.file_scale`, recorded in the manifest with
``file_values``): Hounsfield units for CT, so a viewer's lung, soft-tissue and bone windows show
them as they are; the header's ``cal_min`` / ``cal_max`` hold the modality's display window and
``descrip`` says the volume is synthetic. MRI is written as the model sees it (z-scored). DICOM
series carry the same values, geometry and description, marked as derived and synthetic. A run
folder written before ``file_scale`` existed (CT as HU/1024) has no such manifest entry and is
read with a scale of 1. :func:`read_samples` undoes the scale, so everything that reads samples
back (the preview, the quality report) sees model inputs. Every file is written to a temporary name and
renamed, and the manifest is written after a batch's samples and state, so the manifest lists only
finished batches. ``resume=True`` continues after the last batch the manifest lists and never
rewrites those; samples of an unfinished batch (a run killed while writing) are made again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from invcoss.data import read_manifest, read_nifti, write_nifti, write_png
from invcoss.data.atomic import atomic_save_npy
from invcoss.data.writers import read_dicom_series_array, write_dicom_series
from invcoss.inversion.engine import BatchResult, InversionEngine
from invcoss.inversion.preview import AXIAL_MARKS, montage, radiological_axial

__all__ = [
    "MANIFEST",
    "PREVIEW_COUNT",
    "SAMPLE_FORMATS",
    "check_sample_format",
    "model_digest",
    "nominal_spacing",
    "read_samples",
    "reference_spacing",
    "sample_name",
    "sample_paths",
    "targets_digest",
    "write_batch",
    "write_preview",
    "written_spacing",
]

MANIFEST = "manifest.json"
PREVIEW_COUNT = 16
# The sample formats per dimensionality, the default first.
SAMPLE_FORMATS = {3: ("nifti", "npy", "dicom"), 2: ("npy", "png")}
_SUFFIX = {"nifti": ".nii.gz", "npy": ".npy", "png": ".png", "dicom": ""}  # dicom: a folder per sample
# What a viewer shows of a synthetic volume (NIfTI descrip, DICOM SeriesDescription: <= 64 characters).
SYNTHETIC_DESCRIPTION = "synthetic {modality} (InvCoSS model inversion), not a patient scan"
_DICOM_MODALITY = {"ct": "CT", "mri": "MR"}


def check_sample_format(sample_format: str | None, ndim: int) -> str:
    """The sample format to write for ``ndim`` (None: the default), checked.

    Raises:
        ValueError: a format not available for ``ndim`` (naming the choices), or ``"dicom"``
            without pydicom installed.

    Example:
        >>> check_sample_format(None, 3), check_sample_format("png", 2)
        ('nifti', 'png')
    """
    if sample_format is None:
        return SAMPLE_FORMATS[ndim][0]
    if sample_format not in SAMPLE_FORMATS[ndim]:
        raise ValueError(
            f"sample format must be one of {', '.join(SAMPLE_FORMATS[ndim])} for {ndim}D samples, "
            f"got {sample_format!r}"
        )
    if sample_format == "dicom" and importlib.util.find_spec("pydicom") is None:
        raise ValueError("sample format 'dicom' needs pydicom: pip install 'invcoss[dicom]'")
    return sample_format


def sample_name(modality: str, index: int, ndim: int, sample_format: str | None = None) -> str:
    return f"{modality}_{index:05d}" + _SUFFIX[check_sample_format(sample_format, ndim)]


def nominal_spacing(modality: str, size: tuple[int, ...]) -> tuple[float, float, float] | None:
    """The voxel spacing in mm of a ``size`` window that the preprocessing makes of a default phantom.

    What the written volumes claim when neither the config nor a reference gives a spacing: the
    geometry of :func:`invcoss.data.write_phantoms`' default volumes (``DEFAULT_SIZES`` x
    ``DEFAULT_SPACING``; CT 160 px x 1.6 mm = 256 mm across) put through the modality's
    preprocessing for the model's input size (:func:`invcoss.data.config_for_input`): resampled to
    its spacing when it has one, a window of ``window`` slices, whole slices resized to ``size``.
    None for 2D modalities.

    Example:
        >>> nominal_spacing("ct", (16, 96, 96))  # 24 slices of 1 mm; 256 mm over 96 pixels
        (1.5, 2.6667, 2.6667)
    """
    from invcoss.data import config_for_input
    from invcoss.data.phantoms import DEFAULT_SIZES, DEFAULT_SPACING
    from invcoss.data.transforms import resampled_shape

    if modality not in DEFAULT_SPACING:
        return None
    shape, spacing = DEFAULT_SIZES[modality], DEFAULT_SPACING[modality]
    config = config_for_input(modality, tuple(size))
    if config.spacing is not None:
        shape, spacing = resampled_shape(shape, spacing, config.spacing), config.spacing
    depth = min(config.window or shape[0], shape[0])
    extent = (depth * spacing[0], shape[1] * spacing[1], shape[2] * spacing[2])
    return tuple(round(e / n, 4) for e, n in zip(extent, size))


def reference_spacing(reference) -> tuple[float, float, float] | None:
    """The median voxel spacing of the samples of a preprocessed cache (its manifest), else None.

    ``reference`` is what :func:`~invcoss.inversion.run.run_inversion` takes; a folder of raw scans,
    a list of batches or None give None.
    """
    if not isinstance(reference, str | os.PathLike):
        return None
    try:
        spacings = [s["spacing"] for s in read_manifest(reference)["samples"] if s.get("spacing")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not spacings or any(len(s) != 3 for s in spacings):
        return None
    return tuple(round(float(v), 4) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0))


def written_spacing(
    inv: InversionEngine, reference=None
) -> tuple[tuple[float, float, float] | None, str | None]:
    """The spacing 3D samples are written with and where it comes from, the first of:

    ``"config"`` (the user's ``spacing``), ``"statistics"`` (the median spacing of the data the
    statistics were collected from, :attr:`invcoss.feature_stats.FeatureStats.data`),
    ``"reference"`` (:func:`reference_spacing`), ``"phantoms"`` (:func:`nominal_spacing`);
    ``(None, None)`` for 2D.
    """
    if inv.ndim != 3:
        return None, None
    if inv.config.spacing:
        return inv.config.spacing, "config"
    if inv.data is not None and inv.data.spacing is not None:
        return inv.data.spacing.median, "statistics"
    ref = reference_spacing(reference)
    if ref:
        return ref, "reference"
    return nominal_spacing(inv.space.modality, inv.input_shape[1:]), "phantoms"


def write_batch(
    out: Path,
    inv: InversionEngine,
    result: BatchResult,
    first: int,
    spacing,
    sample_format: str | None = None,
    file_scale: float | None = None,
) -> list[str]:
    """Write one batch's samples (see the module docstring); their names relative to ``out``.

    ``file_scale`` (default the modality's) multiplies the model input in NIfTI files; a run
    resumed from an older folder passes the scale its manifest records.
    """
    space, names = inv.space, []
    fmt = check_sample_format(sample_format, inv.ndim)
    scale = np.float32(space.file_scale if file_scale is None else file_scale)
    description = SYNTHETIC_DESCRIPTION.format(modality=space.modality.upper())
    window = tuple(float(v * scale) for v in space.display_range)
    max_abs = float(max(abs(v) for v in space.value_range) * scale)
    for i, x in enumerate(result.images.numpy()):
        name = sample_name(space.modality, first + i, inv.ndim, fmt)
        view = x[:1] if space.channels == 1 else x
        if fmt == "nifti":
            # x 1024 is exact in float32, so reading back and dividing gives the samples bit for bit
            write_nifti(out / "samples" / name, x[0] * scale, spacing, np.float32, description, window)
        elif fmt == "dicom":
            write_dicom_series(
                out / "samples" / name, x[0] * scale, spacing, _DICOM_MODALITY[space.modality], description,
                max_abs, window,
            )  # fmt: skip
        elif fmt == "png":
            write_png(out / "samples" / name, view)
        else:
            atomic_save_npy(out / "samples" / name, x.astype(np.float32))
            if inv.ndim == 2:
                write_png(out / "png" / name.replace(".npy", ".png"), view)
        names.append(f"samples/{name}")
    return names


def sample_paths(out_dir: str | os.PathLike, manifest: dict | None = None) -> list[Path]:
    """The sample files of a run folder, in sample order, as its manifest lists them."""
    out = Path(out_dir)
    manifest = manifest if manifest is not None else json.loads((out / MANIFEST).read_text())
    return [out / name for b in manifest["batches"] for name in b["samples"]]


def read_samples(paths: list[Path], chunk: int, manifest: dict | None = None) -> Iterator[torch.Tensor]:
    """Sample files back as model inputs, ``chunk`` at a time: ``(B, C, *S)`` float32.

    NIfTI values are divided by the manifest's ``file_scale`` (1 without a manifest or the entry:
    folders written before it existed); PNG grey is replicated to the manifest's channels.
    """
    manifest = manifest or {}
    scale = np.float32(manifest.get("file_scale") or 1.0)
    channels = (manifest.get("sample_shape") or [None])[0]
    for i in range(0, len(paths), chunk):
        arrays = []
        for p in paths[i : i + chunk]:
            if p.name.endswith(".nii.gz"):
                a = read_nifti(p).array[None].astype(np.float32) / scale
            elif p.is_dir():  # a DICOM series
                a = read_dicom_series_array(p)[None] / scale
            elif p.suffix == ".png":
                a = _read_png(p, channels)
            else:
                a = np.load(p)
            arrays.append(a)
        yield torch.from_numpy(np.stack(arrays).astype(np.float32))


def _read_png(path: Path, channels: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
    return np.repeat(a, channels, axis=0) if channels and a.shape[0] == 1 else a


def write_preview(
    path: Path, inv: InversionEngine, paths: list[Path], manifest: dict | None = None
) -> Path | None:
    """A montage of the first samples as a PNG (:mod:`invcoss.inversion.preview`: the central
    axial slice of a volume in radiological orientation, its edges marked A/P/R/L; 2D images as
    stored); None without samples."""

    paths = paths[:PREVIEW_COUNT]
    if not paths:
        return None
    x = next(read_samples(paths, len(paths), manifest)).numpy()  # (K, C, *S)
    if inv.ndim == 3:
        x = radiological_axial(x)  # (K, C, H, W)
    if inv.space.channels == 1:
        x = x[:, :1]
    lo, hi = inv.space.display_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return write_png(path, montage(x, AXIAL_MARKS if inv.ndim == 3 else None))


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)};".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def targets_digest(targets: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 of the statistics targets (float32 bytes of every block's mean and variance)."""
    h = hashlib.sha256()
    for m, v in targets:
        for t in (m, v):
            h.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    return h.hexdigest()
