"""Atomic file output, the one writer of every file invcoss makes: a temporary file, then a rename.

A crash or an interrupt leaves either the old file or the new one, never half of one, so a resumed
run can trust every file it finds.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Have ``write(tmp)`` write a temporary file beside ``path``, then rename it over ``path``.

    For writers that take a file name (safetensors, NIfTI); the file is synced before the rename
    and gets the permissions a plain ``open()`` would give it (mkstemp's are private, 0600).

    Example:
        >>> import tempfile, pathlib
        >>> p = atomic_write_file(pathlib.Path(tempfile.mkdtemp()) / "a.txt", lambda t: open(t, "w").write("hi"))
        >>> p.read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    Example:
        >>> import tempfile, pathlib
        >>> p = atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "a.bin", b"abc")
        >>> p.read_bytes()
        b'abc'
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write_file(path, write)


def canonical_safetensors(raw: bytes) -> bytes:
    """``raw`` (a safetensors file) with its metadata keys in sorted order: the same bytes every run.

    safetensors writes the ``__metadata__`` map in the order of a hash map seeded per instance, so
    two saves of the same tensors and metadata differ in their header. Only the header changes
    here (re-encoded compactly and padded with spaces to 8 bytes, as safetensors pads it); the
    tensor entries, their offsets and the data are kept as they are.

    Example:
        >>> import torch
        >>> from safetensors.torch import load, save
        >>> raw = canonical_safetensors(save({"t": torch.ones(2)}, metadata={"b": "2", "a": "1"}))
        >>> raw[8:60]
        b'{"__metadata__":{"a":"1","b":"2"},"t":{"dtype":"F32"'
        >>> load(raw)["t"].tolist()
        [1.0, 1.0]
    """
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    if "__metadata__" in header:
        out["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    out.update(header)
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def atomic_write_safetensors(
    path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` with ``metadata`` as a safetensors file, atomically and byte-reproducibly."""
    from safetensors.torch import save

    return atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as a ``.npy`` file atomically (readable with ``np.load(mmap_mode="r")``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())
