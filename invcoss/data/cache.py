"""``preprocess``: a folder of scans → a cache of memory-mapped sub-volumes plus ``manifest.json``.

Cache layout::

    CACHE/manifest.json          what is in the cache (below)
    CACHE/arrays/<name>.npy      one float32 array (N, *sample_shape) per source file

``manifest.json`` holds the modality, the :class:`~invcoss.data.pipeline.PreprocessConfig` and its
digest, one ``sources`` entry per source (relative path, size, modification time, array file,
sample count, original shape and spacing; a DICOM series is one source named ``<folder>/series
<UID>``, its size and time those of all its files, see :func:`find_sources`), one ``samples`` entry per sub-volume (source file,
window index, window position, voxel spacing, shape, array file and row) and the ``skipped``
files with the reason and its kind. A re-run reuses every source whose size and modification
time are unchanged and whose array is present, so it does no work on a finished cache; files that
failed are tried again. Arrays and the manifest are written atomically, and the manifest is
refreshed while the run goes, so an interrupted run resumes where it stopped.

One file never ends a run: any failure of one file (reading, decoding, a limit, preprocessing,
writing its array) is caught as a :class:`~invcoss.data.ReadError`, named, counted by kind and
skipped (``strict`` stops at the first instead). A run that leaves the cache without any sample
raises :class:`NoSamplesError` with the reason and a hint, and writes no manifest. Only arrays
listed in the cache's own earlier manifest are ever deleted; other files in the folder are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from invcoss.data.atomic import atomic_save_npy, atomic_write_json
from invcoss.data.dicom import INSTALL_HINT, scan_dicom
from invcoss.data.pipeline import FRAMES, PreprocessConfig, Preprocessor, Source, get_config
from invcoss.data.readers import (
    DEFAULT_LIMITS,
    DICOM,
    FAILED,
    NIFTI_SUFFIXES,
    NON_IMAGE_DICOM,
    NOT_AN_IMAGE,
    OVER_LIMIT,
    PICTURE_SUFFIXES,
    ReadError,
    ReadLimits,
    looks_like_dicom,
    nifti_suffix,
    picture_suffix,
)

MANIFEST = "manifest.json"
CACHE_FORMAT = "invcoss-cache/1"
_FLUSH_SECONDS = 20.0


@dataclass
class PreprocessReport:
    """What a :func:`preprocess` run did.

    ``processed``: files turned into samples in this run; ``reused``: files already in the cache;
    ``skipped``: ``(relative path, reason)`` of the files that could not be used, and
    ``skip_kinds``: the kind of each (``ReadError.kind``, by relative path); ``warnings``:
    ``(relative path, message)`` for files used with a warning (4D series, unusual spacing);
    ``samples``: sub-volumes in the cache now; ``new_samples``: of those, written in this run.
    """

    cache: Path
    processed: int = 0
    reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skip_kinds: dict[str, str] = field(default_factory=dict)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    new_samples: int = 0
    cache_bytes: int = 0
    source_bytes: int = 0

    def skipped_by_kind(self) -> dict[str, int]:
        """Skipped files counted by kind, most frequent first."""
        return dict(Counter(self.skip_kinds[rel] for rel, _ in self.skipped).most_common())


class NoSamplesError(ValueError):
    """A :func:`preprocess` run that leaves the cache without a single sample.

    The message says why (no file, no file of the modality, DICOM without pydicom, every file skipped) and what to
    do; ``report`` is the :class:`PreprocessReport` of the run, with every skipped file named.
    """

    def __init__(self, message: str, report: PreprocessReport) -> None:
        super().__init__(message)
        self.report = report


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
    """Raise :class:`ReadError` when the file's suffix is not a format of the config's modality.

    DICOM files are not single sources: :func:`find_sources` groups them into series first. A
    broken link, a pipe or a device is refused before anything opens it.
    """
    _regular_stat(path)
    if nifti_suffix(path) if config.ndim == 3 else picture_suffix(path):
        return
    if config.ndim == 3:
        raise ReadError(
            path, f"not a NIfTI file (.nii or .nii.gz), which modality {config.modality} needs", NOT_AN_IMAGE
        )
    raise ReadError(path, f"not a PNG/JPEG/TIFF file, which modality {config.modality} needs", NOT_AN_IMAGE)


@dataclass
class FoundSource:
    """One source of samples in a folder: a NIfTI or picture file, a DICOM series or a DICOM image.

    ``rel`` names it relative to the folder (a series: its files' folder and ``series <UID>``);
    ``files`` are the files it is read from (a series has several); ``error`` is why it cannot be
    used, when its header already tells (then ``source`` is its path).
    """

    rel: str
    source: Source
    files: list[Path]
    error: ReadError | None = None


def find_sources(
    folder: Path,
    config: PreprocessConfig,
    limits: ReadLimits = DEFAULT_LIMITS,
    series: str | None = None,
    exclude: Path | None = None,
) -> list[FoundSource]:
    """The sources of samples under ``folder``, and the files that cannot be one with the reason.

    Files of the modality's formats are sources of their own; DICOM files (``.dcm`` or the
    ``DICM`` preamble) are read by their headers and grouped into series (volumes) or single
    images (2D modalities) by :func:`invcoss.data.dicom.scan_dicom`. ``series`` keeps only the
    DICOM series of that ``SeriesInstanceUID`` (other DICOM files are left out, not skipped).

    Raises:
        ValueError: ``series`` is given and no DICOM file of the folder belongs to it.
    """
    sources: list[FoundSource] = []
    dicom: list[Path] = []

    def rel_of(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    for path in list_files(folder, exclude=exclude):
        try:
            _regular_stat(path)
            if not (nifti_suffix(path) if config.ndim == 3 else picture_suffix(path)) and looks_like_dicom(
                path
            ):
                dicom.append(path)
                continue
            check_suffix(path, config)
        except ReadError as e:
            sources.append(FoundSource(rel_of(path), path, [path], e))
            continue
        sources.append(FoundSource(rel_of(path), path, [path]))
    if not dicom and series is None:
        return sources
    scan = scan_dicom(dicom, limits, config.ndim, series)
    if series is not None and series not in scan.uids:
        found = ", ".join(sorted(scan.uids)[:5]) or "none"
        raise ValueError(
            f"--series {series}: no DICOM file in {folder} belongs to that SeriesInstanceUID (found: {found})"
        )
    sources.extend(FoundSource(rel_of(s.label), s, s.files) for s in scan.series)
    sources.extend(FoundSource(rel_of(i.path), i, [i.path]) for i in scan.images)
    sources.extend(FoundSource(rel_of(e.path), e.path, [e.path], e) for e in scan.skipped)
    return sources


def hashed_name(rel: str) -> str:
    """A relative path as ``sha256-<16 hex>`` plus its image suffix (unsalted: it hides a name from a
    reader, not from someone who can guess and hash candidate names).

    Example:
        >>> hashed_name("DOE_JOHN/scan.nii.gz")  # doctest: +ELLIPSIS
        'sha256-...nii.gz'
    """
    m = re.search(r"\.(nii\.gz|nii|png|jpe?g|tiff?|dcm)$", rel, flags=re.IGNORECASE)
    return f"sha256-{hashlib.sha256(rel.encode()).hexdigest()[:16]}{m.group(0) if m else ''}"


def _scrubber(folder: Path, item: FoundSource):
    """A function that replaces, in a message, the names of ``item``'s files (and its own relative
    name) by their :func:`hashed_name`, so that warnings and skip reasons hide them too."""
    names = {item.rel: hashed_name(item.rel)}
    for f in item.files:
        f = Path(f)
        rel = f.relative_to(folder).as_posix() if f.is_relative_to(folder) else f.name
        names[str(f)] = names[rel] = names[f.name] = hashed_name(rel)
    order = sorted(names, key=len, reverse=True)  # the longest first: a path before its file name

    def scrub(text: str) -> str:
        for n in order:
            text = text.replace(n, names[n])
        return text

    return scrub


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
    limits: ReadLimits = DEFAULT_LIMITS,
    frames: str = "first",
    series: str | None = None,
    hash_names: bool = False,
) -> PreprocessReport:
    """Preprocess every file of ``folder`` into the cache ``out_cache`` (see the module docstring).

    Args:
        folder: the scans (searched recursively; hidden files ignored).
        out_cache: the cache folder (created; may already hold a cache of the same configuration).
        modality: ``ct``, ``mri``, ``xray`` or ``pathology``.
        profile: ``paper`` or ``quick`` (ignored when ``config`` is given).
        strict: raise on the first file that cannot be used instead of skipping it.
        config: a full configuration instead of ``(modality, profile)``.
        on_file: called after each file as ``on_file(done, total, relative_path, status)`` with
            status ``"processed"``, ``"reused"`` or ``"skipped"``.
        limits: :class:`~invcoss.data.ReadLimits` checked from each header.
        frames: of a 4D series, the ``"first"`` volume or ``"all"`` volumes (a warning either way).
        series: of the DICOM files, read only the series of this ``SeriesInstanceUID`` (default:
            every series is its own source; see :func:`find_sources`).
        hash_names: record every source file (manifest, array names, ``on_file``, the report) by
            :func:`hashed_name` of its relative path instead of the path, for file names that carry
            patient identifiers.

    Returns:
        :class:`PreprocessReport`; skipped files are listed by name in ``report.skipped``.

    Raises:
        ValueError: ``folder`` missing, bad modality/profile/frames, the cache was built with
            another configuration, or no DICOM file belongs to ``series``.
        NoSamplesError: the cache would hold no sample (no manifest is written).
        ReadError: with ``strict``, the first file that cannot be used (any failure of one file).

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
    if frames not in FRAMES:
        raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
    digest = config.digest()

    old_sources: dict[str, dict] = {}
    owned: set[str] = set()  # arrays an earlier run of this cache wrote: the only files it may delete
    samples_by_source: dict[str, list[dict]] = {}
    if (cache / MANIFEST).exists():
        old = read_manifest(cache)
        if old.get("config_digest") != digest:
            raise ValueError(
                f"cache {cache} was built for {old.get('modality')} with another configuration "
                f"({old.get('config')}); use a new output folder or delete this one"
            )
        old_sources = {s["source"]: s for s in old["sources"]}
        owned = {s["array"] for s in old["sources"]}
        for s in old["samples"]:
            samples_by_source.setdefault(s["source"], []).append(s)
    cache.mkdir(parents=True, exist_ok=True)

    pre = Preprocessor(config, limits, frames)
    found = find_sources(folder, config, limits, series, exclude=cache)
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
            "skipped": [
                {"source": r, "reason": why, "kind": report.skip_kinds[r]} for r, why in report.skipped
            ],
            "frames": frames,
            "series": hashed_name(series) if hash_names and series is not None else series,
            "limits": asdict(limits),
        }

    last_flush = time.monotonic()
    for done, item in enumerate(found, start=1):
        rel, path = item.rel, item.source
        scrub = _scrubber(folder, item) if hash_names else str
        if hash_names:
            rel = hashed_name(rel)
        prev = old_sources.get(rel)
        try:
            if item.error is not None:
                raise item.error
            size, mtime_ns = _stat_files(item.files)
            reuse = (
                prev is not None
                and prev["size"] == size
                and prev["mtime_ns"] == mtime_ns
                and prev.get("files", 1) == len(item.files)
                and prev.get("frames", "first") == frames
                and (cache / prev["array"]).is_file()
            )
            if not reuse:
                result = pre.run(path)
                result.warnings = [scrub(w) for w in result.warnings]
                name = _array_name(rel)
                _save_samples(item.files[0], cache / name, result.samples)
        except ReadError as e:
            if strict:
                raise
            report.skipped.append((rel, scrub(e.reason)))
            report.skip_kinds[rel] = e.kind
            status = "skipped"
        else:
            if reuse:
                sources.append(prev)
                report.reused += 1
                status = "reused"
            else:
                owned.add(name)
                shape = list(config.sample_shape)
                first = {}
                for s in result.samples:
                    first.setdefault(s.frame, s.index)
                samples_by_source[rel] = [
                    {"source": rel, "frame": s.frame, "window": s.index - first[s.frame],
                     "position": list(s.position),
                     "spacing": list(s.spacing) if s.spacing is not None else None,
                     "shape": shape, "array": name, "row": s.index}
                    for s in result.samples
                ]  # fmt: skip
                sources.append({
                    "source": rel, "size": size, "mtime_ns": mtime_ns, "files": len(item.files), "array": name,
                    "count": len(result.samples), "source_shape": list(result.shape),
                    "source_spacing": list(result.spacing) if result.spacing is not None else None,
                    "frames": frames, "source_frames": result.frames, "warnings": result.warnings,
                })  # fmt: skip
                report.warnings.extend((rel, w) for w in result.warnings)
                report.processed += 1
                report.new_samples += len(result.samples)
                status = "processed"
        if on_file is not None:
            on_file(done, len(found), rel, status)
        if report.processed and time.monotonic() - last_flush > _FLUSH_SECONDS:
            atomic_write_json(cache / MANIFEST, manifest())
            last_flush = time.monotonic()

    final = manifest()
    report.samples = len(final["samples"])
    if report.samples == 0:
        raise NoSamplesError(_nothing_usable(folder, files, report, config), report)
    if report.processed or not (cache / MANIFEST).exists() or _changed(cache, final):
        atomic_write_json(cache / MANIFEST, final)
    _remove_orphans(cache, owned - {s["array"] for s in sources})
    report.source_bytes = sum(s["size"] for s in sources)
    report.cache_bytes = sum((cache / s["array"]).stat().st_size for s in sources)
    return report


def _changed(cache: Path, manifest: dict) -> bool:
    try:
        # Compare in JSON form: tuples in memory are lists on disk.
        return json.loads((cache / MANIFEST).read_text()) != json.loads(json.dumps(manifest))
    except (OSError, json.JSONDecodeError):
        return True


def _stat_files(paths: list[Path]) -> tuple[int, int]:
    """Total size and latest modification time (ns) of a source's files: what tells a re-run it changed."""
    stats = [_regular_stat(p) for p in paths]
    return sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)


def _regular_stat(path: Path) -> os.stat_result:
    """``path.stat()``, or :class:`ReadError` for a broken link, a vanished file, a pipe or a device."""
    try:
        st = path.stat()
    except OSError as e:
        raise ReadError(path, f"cannot open ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):  # reading a pipe or a device would block or never end
        raise ReadError(path, "not a regular file", NOT_AN_IMAGE)
    return st


def _save_samples(path: Path, target: Path, samples: list) -> None:
    """Write the samples of ``path`` as one array; any failure (a full disk) is this file's ReadError."""
    try:
        atomic_save_npy(target, np.stack([s.array for s in samples]).astype(np.float32, copy=False))
    except Exception as e:
        raise ReadError(path, f"cannot write its samples ({type(e).__name__}: {e})", FAILED) from e


def _remove_orphans(cache: Path, orphans: set[str]) -> None:
    """Delete arrays this cache wrote for sources that left the folder (nothing else is touched)."""
    for rel in sorted(orphans):
        (cache / rel).unlink(missing_ok=True)


def _nothing_usable(
    folder: Path, files: list[Path], report: PreprocessReport, config: PreprocessConfig
) -> str:
    """Why a run gave no sample, and what to do about it."""
    m = config.modality
    if not files:
        return f"{folder} holds no files (hidden ones are ignored): nothing to preprocess; check --data"
    kinds = report.skipped_by_kind()
    wanted = " or ".join(NIFTI_SUFFIXES if config.ndim == 3 else PICTURE_SUFFIXES)
    if kinds.get(DICOM) == len(files):
        return (
            f"{folder} holds {len(files)} DICOM file(s), and reading DICOM needs pydicom: {INSTALL_HINT} "
            "(or convert each series to NIfTI, e.g. with dcm2niix, and preprocess that folder)"
        )
    if set(kinds) <= {NOT_AN_IMAGE, DICOM, NON_IMAGE_DICOM}:
        found = Counter(Path(r).suffix.lower() or "(no suffix)" for r, _ in report.skipped).most_common(5)
        return (
            f"none of the {len(files)} files in {folder} is a {m} file ({wanted}); found "
            + ", ".join(f"{n} {suffix}" for suffix, n in found)
            + "; check --data and --modality"
        )
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    rel, reason = report.skipped[0]
    hint = "fix or remove them"
    if OVER_LIMIT in kinds:
        hint += ", or raise a limit (--max-voxels, --max-pixels, --min-spacing, --max-spacing)"
    if DICOM in kinds:
        hint += f"; DICOM files need pydicom ({INSTALL_HINT})"
    return f"none of the {len(files)} files in {folder} gave a {m} sample ({counts}; first: {rel}: {reason}); {hint}"
