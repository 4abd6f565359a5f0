"""The files of an inversion run: samples, manifest, preview, resume state.

Layout of an output folder::

    manifest.json                 config, model and statistics identity, per-batch losses and
                                  timings, the quality report; rewritten after every batch
    preview.png                   central slices (3D) or images (2D) of the first 16 samples
    samples/<modality>_00000.nii.gz   3D: float32 NIfTI, (D, H, W), the spacing in the affine
    samples/<modality>_00000.npy      2D: float32 (C, H, W), what the model takes (PNG would round)
    png/<modality>_00000.png          2D: an 8-bit copy for viewing
    state/after_batch_00003.safetensors   what the next batch needs (generator, Adam moments,
                                  repulsive pool); removed when the run completes

Values are in the model's input space (see :data:`invcoss.inversion_config.INPUT_SPACES`; the
manifest's ``intensity`` says what they mean). Every file is written to a temporary name and
renamed, and the manifest is written after a batch's samples and state, so the manifest lists only
finished batches. ``resume=True`` continues after the last batch the manifest lists and never
rewrites those; samples of an unfinished batch (a run killed while writing) are made again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from invcoss.data.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json
from invcoss.inversion import BatchResult, Inverter, StepInfo

__all__ = [
    "MANIFEST",
    "InversionResult",
    "RunFolderError",
    "read_samples",
    "run_inversion",
    "model_digest",
    "sample_paths",
    "targets_digest",
    "write_preview",
]

MANIFEST = "manifest.json"
FORMAT = "invcoss-inversion/1"
CURVE_POINTS = 200  # loss-curve points kept per batch in the manifest
PREVIEW_COUNT = 16


class RunFolderError(ValueError):
    """The output folder cannot take this run (occupied, or holding a different run)."""


@dataclass
class InversionResult:
    """What :func:`run_inversion` did.

    Attributes:
        out_dir: the output folder.
        files: every sample file, in sample order.
        batches_run: batches optimised by this call (0 when the run was already complete).
        manifest: the final manifest as a dict.
        seconds: wall time of this call.
    """

    out_dir: Path
    files: list[Path]
    batches_run: int
    manifest: dict
    seconds: float

    @property
    def quality(self) -> dict:
        return self.manifest.get("quality") or {}


def _subsample(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    n = len(curves["step"])
    if n <= CURVE_POINTS:
        return curves
    keep = np.unique(np.linspace(0, n - 1, CURVE_POINTS).round().astype(int))
    return {k: [v[i] for i in keep] for k, v in curves.items()}


def _sample_name(modality: str, index: int, ndim: int) -> str:
    return f"{modality}_{index:05d}" + (".nii.gz" if ndim == 3 else ".npy")


def _write_batch(out: Path, inv: Inverter, result: BatchResult, first: int, spacing) -> list[str]:
    from invcoss.data import write_nifti, write_png

    space, names = inv.space, []
    for i, x in enumerate(result.images.numpy()):
        name = _sample_name(space.modality, first + i, inv.ndim)
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
    from invcoss.data import read_nifti

    for i in range(0, len(paths), chunk):
        arrays = []
        for p in paths[i : i + chunk]:
            arrays.append(read_nifti(p).array[None] if p.name.endswith(".nii.gz") else np.load(p))
        yield torch.from_numpy(np.stack(arrays).astype(np.float32))


def write_preview(path: Path, inv: Inverter, paths: list[Path]) -> Path | None:
    """A montage of the first samples (central axial slice for 3D) as a PNG; None without samples."""
    from invcoss.data import write_png

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


def _identity(inv: Inverter, num_samples: int) -> dict:
    cfg = inv.model.config
    return {
        "num_samples": num_samples,
        "config": inv.config.to_dict(),
        "model": {
            "preset": cfg.name,
            "config": dataclasses.asdict(cfg),
            "weights_sha256": model_digest(inv.model),
        },
        "stats_sha256": targets_digest(inv.targets),
    }


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _open_folder(out: Path, identity: dict, resume: bool) -> dict | None:
    """The existing manifest to continue, or None for a fresh run; raises if the folder is taken."""
    path = out / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunFolderError(f"cannot read {path}: {e}") from None
        if manifest.get("format") != FORMAT:
            raise RunFolderError(f"{path} is not an invcoss inversion manifest")
        if not resume:
            raise RunFolderError(
                f"{out} already holds an inversion run ({len(manifest['batches'])} of "
                f"{manifest['num_batches']} batches done); pass --resume to continue it or choose another --out"
            )
        differ = [k for k, v in _jsonable(identity).items() if manifest["identity"].get(k) != v]
        if "config" in differ:
            old, new = manifest["identity"]["config"], _jsonable(identity["config"])
            differ.remove("config")
            differ += [f"config.{k}" for k in sorted(new) if old.get(k) != new[k]]
        if differ:
            raise RunFolderError(
                f"cannot resume {out}: its {', '.join(differ)} differ from this run's "
                "(same model, statistics, settings, seed and --num-samples are needed)"
            )
        return manifest
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise RunFolderError(f"{out} is not empty; choose an empty or new folder for --out")
    return None


def _save_state(out: Path, inv: Inverter, batch: int) -> str:
    from safetensors.torch import save

    name = f"state/after_batch_{batch:05d}.safetensors"
    tensors = {k: v.contiguous() for k, v in inv.state_tensors().items()}
    atomic_write_bytes(out / name, save(tensors, metadata={"format": FORMAT, "batch": str(batch)}))
    return name


def _load_state(out: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = out / name
    if not path.is_file():
        raise RunFolderError(f"cannot resume {out}: its state file {name} is missing")
    return load_file(str(path))


def _remove_stale(out: Path, keep: str | None) -> None:
    for p in out.rglob(".*.tmp"):  # temporary files of writes that a kill interrupted
        p.unlink(missing_ok=True)
    state = out / "state"
    if state.is_dir():
        for p in state.iterdir():
            if keep is None or p.name != Path(keep).name:
                p.unlink(missing_ok=True)
        if keep is None:
            state.rmdir()


def run_inversion(
    inv: Inverter,
    num_samples: int,
    out_dir: str | os.PathLike,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
    sources: dict | None = None,
    reference: str | os.PathLike | list[torch.Tensor] | None = None,
    compare_rep: bool = False,
    max_reference: int = 256,
) -> InversionResult:
    """Invert ``num_samples`` samples into ``out_dir`` (see the module docstring), then report quality.

    Args:
        inv: the configured :class:`~invcoss.inversion.Inverter`.
        num_samples: samples to make (also the repulsive pool's capacity).
        out_dir: an empty or new folder, or with ``resume`` the folder of an earlier run.
        resume: continue after the last finished batch of the run in ``out_dir``.
        on_step: progress callback after every optimisation step.
        on_batch: called after each batch is written.
        sources: where the model and statistics came from (recorded in the manifest).
        reference: a folder of real scans or a preprocessed cache of the modality (or its
            batches from :func:`invcoss.inversion_report.reference_batches`), for the reference columns of the quality report (:func:`invcoss.inversion_report.quality_report`).
        compare_rep: also invert once in memory with L_rep toggled and report both diversities.
        max_reference: at most this many reference samples are read.

    Raises:
        RunFolderError: the folder holds another run, or is not empty without ``resume``.
        NonFiniteLossError: a loss became non-finite (the manifest keeps the finished batches).
    """
    from invcoss.inversion_report import quality_report

    t0 = time.perf_counter()
    out = Path(out_dir)
    identity = _identity(inv, num_samples)
    existing = _open_folder(out, identity, resume)
    inv.start(num_samples)
    sizes = inv.batch_sizes(num_samples)
    spacing = inv.config.spacing or inv.space.spacing(inv.input_shape[1:])
    if existing is not None:
        manifest = existing
        done = len(manifest["batches"])
        if 0 < done < len(sizes):
            inv.load_state_tensors(_load_state(out, manifest["resume_state"]), batch=done)
    else:
        manifest = {
            "format": FORMAT,
            "identity": _jsonable(identity),
            "modality": inv.space.modality,
            "num_batches": len(sizes),
            "sample_shape": list(inv.input_shape),
            "intensity": inv.space.description,
            "spacing_mm": list(spacing) if spacing else None,
            "sources": sources or {},
            "batches": [],
            "resume_state": None,
            "complete": False,
        }
        done = 0
    manifest["device"], manifest["backend"] = str(inv.device), inv.backend or "default"
    if out.is_dir():
        _remove_stale(out, manifest.get("resume_state"))
    for b in range(done, len(sizes)):
        result = inv.invert_batch(b, sizes[b], len(sizes), on_step)
        names = _write_batch(out, inv, result, sum(sizes[:b]), spacing)
        state = _save_state(out, inv, b) if b + 1 < len(sizes) else None
        manifest["batches"].append(
            {
                "index": b,
                "samples": names,
                "steps": len(result.curves["step"]),
                "fresh_generator": result.fresh_generator,
                "seconds": round(result.seconds, 3),
                "final": result.final,
                "stat_loss": result.stat_loss,
                "noise_stat_loss": result.noise_stat_loss,
                "curves": _subsample(result.curves),
            }
        )
        manifest["resume_state"] = state
        atomic_write_json(out / MANIFEST, manifest)
        _remove_stale(out, state)
        if on_batch is not None:
            on_batch(result)
    paths = sample_paths(out, manifest)
    write_preview(out / "preview.png", inv, paths)
    manifest["preview"] = "preview.png"
    manifest["quality"] = quality_report(
        inv, manifest, paths, reference=reference, compare_rep=compare_rep, max_reference=max_reference
    )
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    return InversionResult(out, paths, len(sizes) - done, manifest, time.perf_counter() - t0)
