"""An inversion run into a folder: resumable, every file atomic (the file layout: :mod:`.files`).

:func:`run_inversion` drives an :class:`~invcoss.inversion.engine.InversionEngine` batch by batch:
it checks the folder (new, or the same run to resume), writes the manifest before the first batch
(so any folder of a run has one), then each batch's samples, its resume state and the manifest,
and at the end the preview and the quality report. :class:`Inverter` is the engine with that run
as a method, :meth:`Inverter.run`; it is what ``invcoss.inversion`` exports.

Under a process group of several ranks (``torchrun``, :mod:`invcoss.distributed`) the same call
shares the run: each rank inverts its share of the batches into the same folder, the ranks
exchange their features for the repulsive pool after every round, and rank 0 writes the manifest
and the report (:mod:`.shards`). One process runs exactly as without a group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from invcoss import distributed
from invcoss.data.atomic import atomic_write_json, atomic_write_safetensors
from invcoss.inversion.engine import BatchResult, InversionEngine, StepInfo
from invcoss.inversion.files import (
    MANIFEST,
    check_sample_format,
    model_digest,
    sample_paths,
    targets_digest,
    write_batch,
    write_preview,
    written_spacing,
)
from invcoss.inversion.report import quality_report
from invcoss.inversion.shards import (
    agree_on_start,
    exchange_features,
    invert_own_batch,
    read_progress,
    remove_rank_files,
    round_batches,
    shard_batches,
    state_name,
    write_progress,
)
from invcoss.inversion.step import FORMER_STEP, STEP_FIELDS
from invcoss.rng import compute_record

__all__ = ["CURVE_POINTS", "FORMAT", "InversionResult", "Inverter", "RunFolderError", "run_inversion"]


FORMAT = "invcoss-inversion/1"


CURVE_POINTS = 200  # loss-curve points kept per batch in the manifest


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


def _identity(inv: InversionEngine, num_samples: int) -> dict:
    cfg = inv.model.config
    # The generator's range when fitted to the statistics' data (MRI), which the statistics' tensors
    # do not show; absent at the modality's own range, so folders written before it resume as before.
    fitted = {"value_range": list(inv.space.value_range)} if inv.space != inv.config.space else {}
    return {
        **fitted,
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


def _set_value(value) -> str:
    """``value`` as ``--set`` reads it back (JSON, or a plain string)."""
    return value if isinstance(value, str) else json.dumps(value)


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
        differ, hint = [k for k, v in _jsonable(identity).items() if manifest["identity"].get(k) != v], ""
        if "config" in differ:
            # A folder made before the step fields existed ran the former step.
            old = FORMER_STEP | manifest["identity"]["config"]
            new = _jsonable(identity["config"])
            differ.remove("config")
            differ += [f"config.{k}" for k in sorted(new) if old.get(k) != new[k]]
            steps = [k for k in STEP_FIELDS if old.get(k) != new.get(k)]
            if steps:
                hint = "; it ran its steps with " + " ".join(f"--set {k}={_set_value(old[k])}" for k in steps)
        if differ:
            raise RunFolderError(
                f"cannot resume {out}: its {', '.join(differ)} differ from this run's "
                f"(same model, statistics, settings, seed and --num-samples are needed){hint}"
            )
        return manifest
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        # With resume too: a folder without a manifest holds no run of ours to continue, and
        # resuming would write over (and tidy away) whatever it holds.
        what = "holds no inversion run to resume (no manifest.json)" if resume else "is not empty"
        raise RunFolderError(f"{out} {what}; choose an empty or new folder for --out")
    return None


def _save_state(out: Path, inv: InversionEngine, batch: int, name: str | None = None) -> str:
    name = name or f"state/after_batch_{batch:05d}.safetensors"
    tensors = {k: v.contiguous() for k, v in inv.state_tensors().items()}
    atomic_write_safetensors(out / name, tensors, {"format": FORMAT, "batch": str(batch)})
    return name


def _load_state(out: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from invcoss.models.weights import read_safetensors_header

    path = out / name
    if not path.is_file():
        raise RunFolderError(f"cannot resume {out}: its state file {name} is missing")
    try:
        read_safetensors_header(path)  # a truncated or corrupt state is named before it is read
    except ValueError as e:
        raise RunFolderError(f"cannot resume {out}: {e}") from None
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
    inv: InversionEngine,
    num_samples: int,
    out_dir: str | os.PathLike,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
    sources: dict | None = None,
    reference: str | os.PathLike | list[torch.Tensor] | None = None,
    compare_rep: bool = False,
    max_reference: int = 256,
    sample_format: str | None = None,
) -> InversionResult:
    """Invert ``num_samples`` samples into ``out_dir`` (see the module docstring), then report quality.

    Args:
        inv: the configured :class:`~invcoss.inversion.Inverter`.
        num_samples: samples to make (also the repulsive pool's capacity).
        out_dir: an empty or new folder, or with ``resume`` the folder of an earlier run.
        resume: continue after the last finished batch of the run in ``out_dir`` (under a
            process group: after the last round every rank finished, :mod:`.shards`).
        on_step: progress callback after every optimisation step.
        on_batch: called after each batch is written.
        sources: where the model and statistics came from (recorded in the manifest).
        reference: a folder of real scans or a preprocessed cache of the modality (or its
            batches from :func:`invcoss.inversion.report.reference_batches`), for the reference columns of the quality report (:func:`invcoss.inversion.report.quality_report`).
            A cache also gives the spacing written into 3D samples when neither the config nor
            the statistics do (:func:`invcoss.inversion.files.written_spacing`).
        compare_rep: also invert once in memory with L_rep toggled and report both diversities.
        max_reference: at most this many reference samples are read.
        sample_format: how samples are written (:data:`invcoss.inversion.files.SAMPLE_FORMATS`):
            3D ``"nifti"`` (default; CT in Hounsfield units), ``"dicom"`` (a synthetic series per
            sample, needs pydicom) or ``"npy"``; 2D ``"npy"`` (default,
            with an 8-bit PNG copy) or ``"png"`` (8-bit only). A resumed run keeps its format.

    Raises:
        ValueError: a ``sample_format`` not available for the modality's dimensionality.
        RunFolderError: the folder holds a run of another sample format, or another run, is not empty and holds no run to ``resume``
            (without ``resume``, or with it but no manifest: nothing in it is replaced), or its run
            was made at another CPU thread count (recorded as ``compute`` in the manifest).
            Under a process group also: the run was made by another number of ranks, or a rank
            cannot see the folder rank 0 writes.
        NonFiniteLossError: a loss became non-finite (the manifest keeps the finished batches).
        invcoss.distributed.DistributedError: another rank failed or did not answer within the
            timeout (what the ranks finished is kept for ``resume``).
    """

    t0 = time.perf_counter()
    out = Path(out_dir)
    identity = _identity(inv, num_samples)
    fmt = check_sample_format(sample_format, inv.ndim)
    world = distributed.world_size()
    # Rank 0 checks the shared folder; every rank gets its verdict (and stops on the same error).
    existing = distributed.on_main(lambda: _open_folder(out, identity, resume))
    if existing is not None:
        made_as = existing.get("sample_format") or check_sample_format(None, inv.ndim)
        if sample_format is not None and made_as != fmt:
            raise RunFolderError(f"cannot resume {out} as {fmt}: its samples are {made_as}")
        fmt = made_as
    inv.start(num_samples)
    sizes = inv.batch_sizes(num_samples)
    spacing, spacing_from = written_spacing(inv, reference)
    compute = compute_record()
    if existing is not None:
        manifest = existing
        spacing = tuple(manifest["spacing_mm"]) if manifest.get("spacing_mm") else spacing
        made_with = (manifest.get("compute") or {}).get("threads", compute["threads"])
        if made_with != compute["threads"]:
            raise RunFolderError(
                f"cannot resume {out}: it was made with {made_with} CPU threads and this process has "
                f"{compute['threads']}; the samples depend on the count, so resume with --threads {made_with}"
            )
        made_by = manifest.get("world_size", 1)
        if made_by != world and not manifest.get("complete"):
            raise RunFolderError(
                f"cannot resume {out}: it was made by {made_by} process(es) and this launch has {world}; "
                f"resume it with the same number (torchrun --nproc-per-node {made_by}, or one process for 1)"
            )
        done = len(manifest["batches"])
        if world == 1 and 0 < done < len(sizes):
            inv.load_state_tensors(_load_state(out, manifest["resume_state"]), batch=done)
    else:
        manifest = {
            "format": FORMAT,
            "identity": _jsonable(identity),
            "modality": inv.space.modality,
            "num_batches": len(sizes),
            "sample_shape": list(inv.input_shape),
            "intensity": inv.space.description,
            "sample_format": fmt,
            "file_scale": inv.space.file_scale if fmt in ("nifti", "dicom") else 1.0,
            "file_values": inv.space.file_values if fmt in ("nifti", "dicom") else "the model input",
            "spacing_mm": list(spacing) if spacing else None,
            "spacing_from": spacing_from,
            "sources": sources or {},
            "batches": [],
            "resume_state": None,
            "complete": False,
        }
        if world > 1:
            manifest["world_size"] = world
        done = 0
    manifest["device"], manifest["backend"] = str(inv.device), inv.backend or "default"
    manifest["compute"] = compute
    if existing is None and distributed.is_main():
        # Written before the first batch, so a run killed in it is still ours to --resume.
        atomic_write_json(out / MANIFEST, manifest)
    if world > 1:
        # Rank 0's manifest, once written: every rank writes the same spacing and scale.
        manifest = distributed.broadcast_object(manifest)
        spacing = tuple(manifest["spacing_mm"]) if manifest.get("spacing_mm") else None
        report = dict(reference=reference, compare_rep=compare_rep, max_reference=max_reference)
        return _run_shards(inv, out, manifest, sizes, spacing, fmt, on_step, on_batch, report, t0)
    if out.is_dir():
        _remove_stale(out, manifest.get("resume_state"))
    for b in range(done, len(sizes)):
        result = inv.invert_batch(b, sizes[b], len(sizes), on_step)
        names = write_batch(out, inv, result, sum(sizes[:b]), spacing, fmt, manifest.get("file_scale") or 1.0)
        state = _save_state(out, inv, b) if b + 1 < len(sizes) else None
        manifest["batches"].append(_batch_record(result, names))
        manifest["resume_state"] = state
        atomic_write_json(out / MANIFEST, manifest)
        _remove_stale(out, state)
        if on_batch is not None:
            on_batch(result)
    paths = _finish(
        inv, out, manifest, reference=reference, compare_rep=compare_rep, max_reference=max_reference
    )
    return InversionResult(out, paths, len(sizes) - done, manifest, time.perf_counter() - t0)


def _batch_record(result: BatchResult, names: list[str]) -> dict:
    """A batch as the manifest lists it."""
    return {
        "index": result.index,
        "samples": names,
        "steps": len(result.curves["step"]),
        "fresh_generator": result.fresh_generator,
        "seconds": round(result.seconds, 3),
        "final": result.final,
        "stat_loss": result.stat_loss,
        "noise_stat_loss": result.noise_stat_loss,
        "curves": _subsample(result.curves),
    }


def _finish(inv: InversionEngine, out: Path, manifest: dict, **report) -> list[Path]:
    """Write the preview and the quality report of a run whose batches are all done; its samples."""
    paths = sample_paths(out, manifest)
    write_preview(out / "preview.png", inv, paths, manifest)
    manifest["preview"] = "preview.png"
    manifest["quality"] = quality_report(inv, manifest, paths, **report)
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    return paths


def _run_shards(
    inv: InversionEngine,
    out: Path,
    manifest: dict,
    sizes: list[int],
    spacing,
    fmt: str,
    on_step: Callable[[StepInfo], None] | None,
    on_batch: Callable[[BatchResult], None] | None,
    report: dict,
    t0: float,
) -> InversionResult:
    """The batch loop of a run shared by the ranks of a process group (:mod:`.shards`)."""
    rank, world = distributed.rank(), distributed.world_size()
    if manifest["complete"]:  # nothing left to invert: rank 0 reports again, as one process does
        paths = []
        if rank == 0:
            paths = _finish(inv, out, manifest, **report)
            remove_rank_files(out)  # left by a kill just after the merge
        return InversionResult(out, paths, 0, manifest, time.perf_counter() - t0)
    group = 1 if inv.config.generator == "pixels" else inv.config.generator_every
    shards = shard_batches(len(sizes), group, world)
    mine, num_rounds = shards[rank], max(len(s) for s in shards)
    idle = [str(q) for q, s in enumerate(shards) if not s]
    if idle and rank == 0:
        warnings.warn(
            f"rank {', '.join(idle)} of {world} will invert nothing: {len(sizes)} batches make "
            f"{math.ceil(len(sizes) / group)} generator group(s) of {group} batches "
            "(generator_every), one rank each; ask for more samples or --set generator_every=1",
            UserWarning,
            stacklevel=3,
        )
    if rank == 0:
        for p in out.rglob(".*.tmp"):  # writes a kill interrupted; before any rank writes again
            p.unlink(missing_ok=True)
    # Each rank reads its own files; a problem on any rank stops every rank (distributed.on_all).
    try:
        progress = distributed.on_all(lambda: read_progress(out, rank))
        start = agree_on_start(out, progress)
    except ValueError as e:
        raise RunFolderError(str(e)) from None
    records = [r for r in progress["batches"] if r["round"] < start]
    states = [state_name(rank, start - 1)] if start > 0 else []
    if start > 0:
        state = distributed.on_all(lambda: _load_state(out, states[0]))
        inv.load_state_tensors(state, batch=mine[start] if start < len(mine) else 0)
    write_progress(out, rank, progress | {"rounds": start, "batches": records, "states": states})
    ran = 0
    for t in range(start, num_rounds):
        result, batches = None, round_batches(shards, t)
        if t < len(mine):
            b = mine[t]
            result = invert_own_batch(inv, b, sizes, on_step)
            names = write_batch(
                out, inv, result, sum(sizes[:b]), spacing, fmt, manifest.get("file_scale") or 1.0
            )
            records.append(_batch_record(result, names) | {"rank": rank, "round": t})
            ran += 1
        exchange_features(inv, batches, None if result is None else result.embeddings)
        states = [*states[-1:], _save_state(out, inv, t, state_name(rank, t))]
        write_progress(
            out,
            rank,
            {"rank": rank, "world_size": world, "rounds": t + 1, "batches": records, "states": states},
        )
        if on_batch is not None and result is not None:
            on_batch(result)
    gathered = distributed.all_gather_object((records, ran))  # also: every rank has finished
    if rank != 0:
        mine_paths = [out / n for r in records for n in r["samples"]]
        return InversionResult(out, mine_paths, ran, manifest, time.perf_counter() - t0)
    batches = sorted((r for recs, _ in gathered for r in recs), key=lambda r: r["index"])
    manifest["batches"] = [{k: v for k, v in r.items() if k != "round"} for r in batches]
    # The rank files go only once the complete manifest is written: a kill before that merges again.
    paths = _finish(inv, out, manifest, **report)
    remove_rank_files(out)
    return InversionResult(out, paths, sum(n for _, n in gathered), manifest, time.perf_counter() - t0)


class Inverter(InversionEngine):
    """An :class:`~invcoss.inversion.engine.InversionEngine` that also writes runs to folders.

    Example:
        >>> from invcoss.models import create_model
        >>> from invcoss.inversion.config import InversionConfig
        >>> model = create_model("vit_nano", img_size_2d=32)
        >>> stats = [(torch.zeros(5, 96), torch.ones(5, 96))] * 4
        >>> cfg = InversionConfig.from_profile("quick", "xray", batch_size=2, steps=1, warmup_steps=1,
        ...                                    latent_dim=8, generator_channels=(8, 8, 4))
        >>> import tempfile
        >>> Inverter(model, stats, cfg, backend="torch").run(4, tempfile.mkdtemp()).batches_run
        1
    """

    def run(
        self, num_samples: int, out_dir: str | os.PathLike, resume: bool = False, **kwargs
    ) -> InversionResult:
        """Invert ``num_samples`` samples into ``out_dir``; see :func:`run_inversion`."""
        return run_inversion(self, num_samples, out_dir, resume=resume, **kwargs)
