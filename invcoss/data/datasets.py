"""torch Datasets over a preprocessed cache or over a raw folder of scans.

Both return one channel-first float32 tensor per item: ``(1, D, H, W)`` for CT/MRI, ``(3, H, W)``
for X-ray and pathology, exactly what :class:`invcoss.models.MAE` takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from invcoss.data.cache import MANIFEST, find_sources, read_manifest
from invcoss.data.pipeline import PreprocessConfig, Preprocessor, Sample, Source, get_config
from invcoss.data.readers import DEFAULT_LIMITS, ReadError, ReadLimits


class CachedDataset(Dataset):
    """The samples of a cache written by :func:`invcoss.data.preprocess`, read through memory maps.

    Attributes:
        modality, config: what the cache was built with.
        sample_shape: shape of one item.
        source_bytes: total size of the source files the cache was made from.
        cache_bytes: total size of the cached arrays.

    Raises:
        ValueError: not a cache, ``modality`` differs from the cache's, or an array file is missing.

    Example:
        >>> import tempfile
        >>> from invcoss.data import preprocess, write_phantoms
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> _ = write_phantoms(src, "pathology", 1, size=(64, 64))
        >>> _ = preprocess(src, dst, "pathology", "quick")
        >>> ds = CachedDataset(dst)
        >>> len(ds), tuple(ds[0].shape)
        (1, (3, 112, 112))
    """

    def __init__(self, cache: str | os.PathLike, modality: str | None = None) -> None:
        self.root = Path(cache)
        manifest = read_manifest(self.root)
        self.modality = manifest["modality"]
        if modality is not None and modality != self.modality:
            raise ValueError(
                f"cache {self.root} holds {self.modality} data, but modality {modality!r} was asked for"
            )
        self.config = PreprocessConfig.from_dict(manifest["config"])
        self.sample_shape = tuple(manifest["sample_shape"])
        self.samples = manifest["samples"]
        self.skipped = [(s["source"], s["reason"]) for s in manifest.get("skipped", [])]
        missing = [s["array"] for s in manifest["sources"] if not (self.root / s["array"]).is_file()]
        if missing:
            raise ValueError(f"cache {self.root} is incomplete: missing {missing[:3]}; run preprocess again")
        self.source_bytes = sum(s["size"] for s in manifest["sources"])
        self.cache_bytes = sum((self.root / s["array"]).stat().st_size for s in manifest["sources"])
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.samples[i]
        arr = self._maps.get(s["array"])
        if arr is None:
            # Opened lazily so every DataLoader worker maps the files itself.
            arr = self._maps[s["array"]] = np.load(self.root / s["array"], mmap_mode="r")
        return torch.from_numpy(np.array(arr[s["row"]], dtype=np.float32))


class FolderDataset(Dataset):
    """Samples straight from a folder of scans, preprocessed on the fly under ``config``.

    Files are listed and their sample counts taken from headers when the dataset is built;
    files whose header cannot be read (or of the wrong type) are left out and listed in
    ``skipped`` (or raise with ``strict``); ``limits`` and ``frames`` are those of
    :class:`~invcoss.data.Preprocessor`. DICOM files are grouped into series, each one source
    (``series`` keeps one ``SeriesInstanceUID``; see :func:`~invcoss.data.cache.find_sources`). Voxel data is read when an item is asked for, and the
    samples of the most recent file are kept, so in-order access reads each file once. For
    repeated epochs, :func:`invcoss.data.preprocess` once and use :class:`CachedDataset`.

    Raises:
        ValueError: ``folder`` is not a folder, or no file in it can be read.
        ReadError: with ``strict``, the first unreadable file (also, at item access, a file whose
            voxel data turns out unreadable).

    Example:
        >>> import tempfile
        >>> from invcoss.data import get_config, write_phantoms
        >>> src = tempfile.mkdtemp()
        >>> _ = write_phantoms(src, "xray", 3, size=(64, 64))
        >>> ds = FolderDataset(src, get_config("xray", "quick"))
        >>> len(ds), tuple(ds[2].shape)
        (3, (3, 112, 112))
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        config: PreprocessConfig,
        strict: bool = False,
        limits: ReadLimits = DEFAULT_LIMITS,
        frames: str = "first",
        series: str | None = None,
    ) -> None:
        self.root = Path(folder)
        if not self.root.is_dir():
            raise ValueError(f"data folder {self.root} does not exist or is not a folder")
        self.config = config
        self.modality = config.modality
        self.sample_shape = config.sample_shape
        self.pre = Preprocessor(config, limits, frames)
        self.files: list[Source] = []
        self.index: list[tuple[int, int]] = []
        self.skipped: list[tuple[str, str]] = []
        source_bytes = 0
        for found in find_sources(self.root, config, limits, series):
            try:
                if found.error is not None:
                    raise found.error
                n = self.pre.count(found.source)
            except ReadError as e:
                if strict:
                    raise
                self.skipped.append((found.rel, e.reason))
                continue
            self.index.extend((len(self.files), k) for k in range(n))
            self.files.append(found.source)
            source_bytes += sum(p.stat().st_size for p in found.files)
        if not self.files:
            raise ValueError(
                f"no readable {config.modality} file in {self.root} ({len(self.skipped)} skipped)"
            )
        self.source_bytes = source_bytes
        self._last: tuple[int, list[Sample]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        f, k = self.index[i]
        if self._last is None or self._last[0] != f:
            self._last = (f, self.pre(self.files[f]))
        return torch.from_numpy(self._last[1][k].array)


def open_dataset(
    path: str | os.PathLike,
    modality: str | None = None,
    config: PreprocessConfig | None = None,
    strict: bool = False,
) -> CachedDataset | FolderDataset:
    """A cache (a folder with ``manifest.json``) as :class:`CachedDataset`, else a :class:`FolderDataset`.

    Args:
        path: a cache or a folder of scans.
        modality: expected modality (required for a raw folder unless ``config`` is given).
        config: preprocessing for a raw folder (default: the ``paper`` profile of ``modality``).
        strict: for a raw folder, fail on the first unreadable file.

    Raises:
        ValueError: path missing, modality unknown or different from the cache's.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return CachedDataset(path, modality)
    if config is None:
        if modality is None:
            raise ValueError(f"{path} is not a cache; give the modality to read it as a folder of scans")
        config = get_config(modality, "paper")
    elif modality is not None and config.modality != modality:
        raise ValueError(
            f"config is for modality {config.modality!r}, but modality {modality!r} was asked for"
        )
    return FolderDataset(path, config, strict=strict)
