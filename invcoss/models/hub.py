"""Files from the Hugging Face Hub's local cache, offline first.

:func:`hub_download` and :func:`hub_snapshot` wrap ``huggingface_hub`` (an optional dependency):
by default they only read the local cache (``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir``) and
never open a connection; ``allow_download=True`` lets them fetch what is missing, unless
``HF_HUB_OFFLINE=1`` is set, which huggingface_hub itself enforces. A file that is not cached is a
``FileNotFoundError`` that says how to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["hub_download", "hub_snapshot", "looks_like_repo_id"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_repo_id(source: object) -> bool:
    """True for a string of the form ``owner/name`` that is not an existing local path.

    Example:
        >>> looks_like_repo_id("timm/vit_base_patch16_224.mae"), looks_like_repo_id("/tmp")
        (True, False)
    """
    return isinstance(source, str) and bool(_REPO_ID.match(source)) and not os.path.exists(source)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "loading by Hugging Face Hub repository id needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    return huggingface_hub


def _not_cached(repo_id: str, what: str, cache_dir: str | os.PathLike | None) -> FileNotFoundError:
    where = cache_dir or "the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
    return FileNotFoundError(
        f"{what} of Hugging Face Hub repository {repo_id!r} is not in {where}; download it first "
        f"(`hf download {repo_id}`) or pass allow_download=True (HF_HUB_OFFLINE=1 forbids downloads)"
    )


def hub_download(
    repo_id: str, filename: str, cache_dir: str | os.PathLike | None = None, allow_download: bool = False
) -> Path:
    """The local path of one file of a Hub repository, from the cache (downloaded only if allowed).

    Raises:
        ImportError: huggingface_hub is not installed.
        FileNotFoundError: the file is not cached and may not be downloaded.
    """
    hub = _hub()
    try:
        return Path(
            hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=not allow_download)
        )
    except (hub.errors.LocalEntryNotFoundError, hub.errors.EntryNotFoundError, OSError):
        raise _not_cached(repo_id, filename, cache_dir) from None


def hub_snapshot(
    repo_id: str,
    filenames: list[str],
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> Path:
    """The local folder holding ``filenames`` of a Hub repository's snapshot (from the cache first).

    Raises:
        ImportError: huggingface_hub is not installed.
        FileNotFoundError: one of the files is not cached and may not be downloaded.
    """
    paths = [hub_download(repo_id, name, cache_dir, allow_download) for name in filenames]
    folders = {p.parent for p in paths}
    if len(folders) != 1:
        raise FileNotFoundError(f"the cached files of {repo_id!r} come from different revisions: {paths}")
    return folders.pop()
