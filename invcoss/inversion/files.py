"""The files of an inversion run: samples, manifest, preview, resume state (the run: :mod:`.run`).

Layout of an output folder::

    manifest.json                 config, model and statistics identity, per-batch losses and
                                  timings, the quality report; rewritten after every batch
    preview.png                   central slices (3D) or images (2D) of the first 16 samples
    samples/<modality>_00000.nii.gz   3D: float32 NIfTI, (D, H, W), the spacing in the affine
                                  (the config's, a reference cache's or :func:`nominal_spacing`)
    samples/<modality>_00000.npy      2D: float32 (C, H, W), what the model takes (PNG would round)
    png/<modality>_00000.png          2D: an 8-bit copy for viewing
    state/after_batch_00003.safetensors   what the next batch needs (generator, Adam moments,
                                  repulsive pool); removed when the run completes

Values are in the model's input space (see :data:`invcoss.modality.INPUT_SPACES`; the
manifest's ``intensity`` says what they mean). Every file is written to a temporary name and
renamed, and the manifest is written after a batch's samples and state, so the manifest lists only
finished batches. ``resume=True`` continues after the last batch the manifest lists and never
rewrites those; samples of an unfinished batch (a run killed while writing) are made again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from invcoss.data import read_manifest, read_nifti, write_nifti, write_png
from invcoss.data.atomic import atomic_save_npy
from invcoss.inversion.engine import BatchResult, InversionEngine

__all__ = [
    "MANIFEST",
    "PREVIEW_COUNT",
    "model_digest",
    "nominal_spacing",
    "read_samples",
    "reference_spacing",
    "sample_name",
    "sample_paths",
    "targets_digest",
    "write_batch",
    "write_preview",
]

MANIFEST = "manifest.json"
PREVIEW_COUNT = 16


def sample_name(modality: str, index: int, ndim: int) -> str:
    return f"{modality}_{index:05d}" + (".nii.gz" if ndim == 3 else ".npy")


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


def write_batch(out: Path, inv: InversionEngine, result: BatchResult, first: int, spacing) -> list[str]:

    space, names = inv.space, []
    for i, x in enumerate(result.images.numpy()):
        name = sample_name(space.modality, first + i, inv.ndim)
        if inv.ndim == 3:
            write_nifti(out / "samples" / name, x[0], spacing, np.float32)
        else:
            atomic_save_npy(out / "samples" / name, x.astype(np.float32))
            view = x[:1] if space.channels == 1 else x
            write_png(out / "png" / name.replace(".npy", ".png"), view)
        names.append(f"samples/{name}")
    return names


def sample_paths(out_dir: str | os.PathLike, manifest: dict | None = None) -> list[Path]:
    """The sample files of a run folder, in sample order, as its manifest lists them."""
    out = Path(out_dir)
    manifest = manifest if manifest is not None else json.loads((out / MANIFEST).read_text())
    return [out / name for b in manifest["batches"] for name in b["samples"]]


def read_samples(paths: list[Path], chunk: int) -> Iterator[torch.Tensor]:
    """Sample files back as model inputs, ``chunk`` at a time: ``(B, C, *S)`` float32."""

    for i in range(0, len(paths), chunk):
        arrays = []
        for p in paths[i : i + chunk]:
            arrays.append(read_nifti(p).array[None] if p.name.endswith(".nii.gz") else np.load(p))
        yield torch.from_numpy(np.stack(arrays).astype(np.float32))


def write_preview(path: Path, inv: InversionEngine, paths: list[Path]) -> Path | None:
    """A montage of the first samples (central axial slice for 3D) as a PNG; None without samples."""

    paths = paths[:PREVIEW_COUNT]
    if not paths:
        return None
    x = next(read_samples(paths, len(paths))).numpy()  # (K, C, *S)
    if inv.ndim == 3:
        x = x[:, :, x.shape[2] // 2]  # (K, C, H, W)
    if inv.space.channels == 1:
        x = x[:, :1]
    lo, hi = inv.space.display_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    k, c, h, w = x.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    gap = 2
    canvas = np.ones((c, rows * (h + gap) - gap, cols * (w + gap) - gap), dtype=np.float32)
    for i in range(k):
        r, q = divmod(i, cols)
        canvas[:, r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = x[i]
    return write_png(path, canvas)


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
