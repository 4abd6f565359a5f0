"""``preprocess``: a folder of scans → a cache of memory-mapped sub-volumes plus ``manifest.json``.

Cache layout::

    CACHE/manifest.json          what is in the cache (below)
    CACHE/arrays/<name>.npy      one float32 array (N, *sample_shape) per source file

``manifest.json`` holds the modality, the :class:`~invcoss.data.pipeline.PreprocessConfig` and its
digest, one ``sources`` entry per file (relative path, size, modification time, array file,
sample count, original shape and spacing), one ``samples`` entry per sub-volume (source file,
window index, window position, voxel spacing, shape, array file and row) and the ``skipped``
files with the reason. A re-run reuses every source whose size and modification time are
unchanged and whose array is present, so it does no work on a finished cache; files that failed
are tried again. Arrays and the manifest are written atomically, and the manifest is refreshed
while the run goes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from invcoss.data.atomic import atomic_save_npy, atomic_write_json
from invcoss.data.pipeline import PreprocessConfig, Preprocessor, get_config
from invcoss.data.readers import ReadError, nifti_suffix, picture_suffix

MANIFEST = "manifest.json"
CACHE_FORMAT = "invcoss-cache/1"
_FLUSH_SECONDS = 20.0


@dataclass
class PreprocessReport:
    """What a :func:`preprocess` run did.

    ``processed``: files turned into samples in this run; ``reused``: files already in the cache;
    ``skipped``: ``(relative path, reason)`` of the files that could not be read; ``samples``:
    sub-volumes in the cache now; ``new_samples``: of those, written in this run.
    """

    cache: Path
    processed: int = 0
    reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    new_samples: int = 0
    cache_bytes: int = 0
    source_bytes: int = 0


def list_files(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Every regular file under ``folder`` (recursively, sorted), hidden names and ``exclude`` left out."""
    folder = Path(folder)
    exclude = Path(exclude).resolve() if exclude is not None else None
    out = []
    for root, dirs, files in os.walk(folder):
        rootp = Path(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (exclude is None or (rootp / d).resolve() != exclude)
        )
        out.extend(rootp / f for f in sorted(files) if not f.startswith("."))
    return out


def check_suffix(path: Path, config: PreprocessConfig) -> None:
    """Raise :class:`ReadError` when the file's suffix is not a format of the config's modality."""
    if config.ndim == 3 and not nifti_suffix(path):
        raise ReadError(path, f"not a NIfTI file (.nii or .nii.gz), which modality {config.modality} needs")
    if config.ndim == 2 and not picture_suffix(path):
        raise ReadError(path, f"not a PNG/JPEG/TIFF file, which modality {config.modality} needs")


def _array_name(rel: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rel).name)
    stem = re.sub(r"\.(nii\.gz|nii|png|jpe?g|tiff?)$", "", stem, flags=re.IGNORECASE)
    return f"arrays/{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:10]}.npy"


def read_manifest(cache: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of a cache folder.

    Raises:
        ValueError: no manifest, or not a cache this version can read.
    """
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{cache} is not a preprocessed cache (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read manifest ({e})") from e
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{path}: unknown cache format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}"
        )
    return manifest


def preprocess(
    folder: str | os.PathLike,
    out_cache: str | os.PathLike,
    modality: str,
    profile: str = "paper",
    strict: bool = False,
    config: PreprocessConfig | None = None,
    on_file: Callable[[int, int, str, str], None] | None = None,
) -> PreprocessReport:
    """Preprocess every file of ``folder`` into the cache ``out_cache`` (see the module docstring).

    Args:
        folder: the scans (searched recursively; hidden files ignored).
        out_cache: the cache folder (created; may already hold a cache of the same configuration).
        modality: ``ct``, ``mri``, ``xray`` or ``pathology``.
        profile: ``paper`` or ``quick`` (ignored when ``config`` is given).
        strict: raise on the first file that cannot be read instead of skipping it.
        config: a full configuration instead of ``(modality, profile)``.
        on_file: called after each file as ``on_file(done, total, relative_path, status)`` with
            status ``"processed"``, ``"reused"`` or ``"skipped"``.

    Returns:
        :class:`PreprocessReport`; unreadable files are listed by name in ``report.skipped``.

    Raises:
        ValueError: ``folder`` missing, bad modality/profile, or the cache was built with another
            configuration.
        ReadError: with ``strict``, the first file that cannot be read.

    Example:
        >>> import tempfile
        >>> from invcoss.data import write_phantoms
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> _ = write_phantoms(src, "xray", 2, size=(64, 64))
        >>> r = preprocess(src, dst, "xray", "quick")
        >>> r.processed, r.samples, preprocess(src, dst, "xray", "quick").reused
        (2, 2, 2)
    """
    folder, cache = Path(folder), Path(out_cache)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist or is not a folder")
    if config is None:
        config = get_config(modality, profile)
    elif config.modality != modality:
        raise ValueError(
            f"config is for modality {config.modality!r}, but modality {modality!r} was asked for"
        )
    digest = config.digest()

    old_sources: dict[str, dict] = {}
    samples_by_source: dict[str, list[dict]] = {}
    if (cache / MANIFEST).exists():
        old = read_manifest(cache)
        if old.get("config_digest") != digest:
            raise ValueError(
                f"cache {cache} was built for {old.get('modality')} with another configuration "
                f"({old.get('config')}); use a new output folder or delete this one"
            )
        old_sources = {s["source"]: s for s in old["sources"]}
        for s in old["samples"]:
            samples_by_source.setdefault(s["source"], []).append(s)
    cache.mkdir(parents=True, exist_ok=True)

    pre = Preprocessor(config)
    files = list_files(folder, exclude=cache)
    report = PreprocessReport(cache=cache)
    sources: list[dict] = []

    def manifest() -> dict:
        return {
            "format": CACHE_FORMAT,
            "modality": config.modality,
            "config": config.to_dict(),
            "config_digest": digest,
            "sample_shape": list(config.sample_shape),
            "dtype": "float32",
            "sources": sources,
            "samples": [s for src in sources for s in samples_by_source[src["source"]]],
            "skipped": [{"source": r, "reason": why} for r, why in report.skipped],
        }

    last_flush = time.monotonic()
    for done, path in enumerate(files, start=1):
        rel = path.relative_to(folder).as_posix()
        st = path.stat()
        prev = old_sources.get(rel)
        if (
            prev is not None
            and prev["size"] == st.st_size
            and prev["mtime_ns"] == st.st_mtime_ns
            and (cache / prev["array"]).is_file()
        ):
            sources.append(prev)
            report.reused += 1
            status = "reused"
        else:
            try:
                check_suffix(path, config)
                image = pre.read(path)
                samples = pre(image)
            except ReadError as e:
                if strict:
                    raise
                report.skipped.append((rel, e.reason))
                status = "skipped"
            else:
                name = _array_name(rel)
                atomic_save_npy(cache / name, np.stack([s.array for s in samples]).astype(np.float32))
                shape = list(config.sample_shape)
                samples_by_source[rel] = [
                    {"source": rel, "window": s.index, "position": list(s.position),
                     "spacing": list(s.spacing) if s.spacing is not None else None,
                     "shape": shape, "array": name, "row": s.index}
                    for s in samples
                ]  # fmt: skip
                geometry = image.array.shape
                sources.append({
                    "source": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "array": name,
                    "count": len(samples), "source_shape": list(geometry),
                    "source_spacing": list(getattr(image, "spacing", ())) or None,
                })  # fmt: skip
                report.processed += 1
                report.new_samples += len(samples)
                status = "processed"
        if on_file is not None:
            on_file(done, len(files), rel, status)
        if report.processed and time.monotonic() - last_flush > _FLUSH_SECONDS:
            atomic_write_json(cache / MANIFEST, manifest())
            last_flush = time.monotonic()

    final = manifest()
    if report.processed or not (cache / MANIFEST).exists() or _changed(cache, final):
        atomic_write_json(cache / MANIFEST, final)
    _remove_orphans(cache, {s["array"] for s in sources})
    report.samples = len(final["samples"])
    report.source_bytes = sum(s["size"] for s in sources)
    report.cache_bytes = sum((cache / s["array"]).stat().st_size for s in sources)
    return report


def _changed(cache: Path, manifest: dict) -> bool:
    try:
        # Compare in JSON form: tuples in memory are lists on disk.
        return json.loads((cache / MANIFEST).read_text()) != json.loads(json.dumps(manifest))
    except (OSError, json.JSONDecodeError):
        return True


def _remove_orphans(cache: Path, keep: set[str]) -> None:
    """Delete arrays of sources that left the folder (only ``arrays/*.npy`` this cache wrote)."""
    arrays = cache / "arrays"
    if not arrays.is_dir():
        return
    for p in arrays.glob("*.npy"):
        if f"arrays/{p.name}" not in keep:
            p.unlink()
