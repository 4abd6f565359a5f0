"""The weights file and the weights' identity, below the checkpoint format (:mod:`.checkpoint`).

* :func:`read_safetensors_header` reads and checks a safetensors file's header without loading a
  tensor: the 8-byte length, the JSON, every tensor's dtype, shape and byte range, the ranges
  covering the data exactly. A truncated, padded or corrupt file is a ``ValueError`` naming it.
* :func:`weights_hash`: SHA-256 over every state-dict entry's name, dtype, shape and bytes, in name
  order; what feature statistics record of the model they were collected with.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["FLOATING_DTYPES", "TORCH_DTYPE_NAMES", "read_safetensors_header", "weights_hash"]

# safetensors' own limit on the JSON header; a larger length field is a corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOATING_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
TORCH_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def weights_hash(state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a model's weights: every state-dict entry's name, dtype, shape and bytes, in
    name order. The same weights give the same hash on any device; a cast or any changed value gives
    another.

    Example:
        >>> from invcoss.models import create_model
        >>> _ = torch.manual_seed(0); a = create_model("vit_nano")
        >>> _ = torch.manual_seed(0); b = create_model("vit_nano")
        >>> weights_hash(a) == weights_hash(b.state_dict()), weights_hash(a) == weights_hash(b.half())
        (True, False)
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` of a safetensors file, checked without loading a tensor.

    Raises:
        ValueError: naming the file, when it is shorter than its header says, the header is not
            JSON or not a safetensors header, a tensor's dtype is unknown, its byte range does not
            match its shape or lies outside the file, or the ranges do not cover the data exactly
            (a truncated or padded file).

    Example:
        >>> import tempfile, pathlib
        >>> from safetensors.torch import save_file
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"w": torch.zeros(2, 3)}, str(p), {"format": "pt"})
        >>> read_safetensors_header(p)
        ({'w': ('F32', (2, 3))}, {'format': 'pt'})
        >>> p.write_bytes(p.read_bytes()[:-4])  # truncated
        116
        >>> try:
        ...     read_safetensors_header(p)
        ... except ValueError as e:
        ...     print(str(e).split(" is ", 1)[1])
        truncated or padded: its tensors end at byte 24 of the data, the file holds 20
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header length field says "
                f"{length} bytes, the file has {size}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path} is corrupt: its metadata is not a string mapping")
    data_size = size - 8 - length
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges = []
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            dtype not in _ITEMSIZE
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) for n in offsets)
        ):
            raise ValueError(f"{path} is corrupt: tensor {name!r} has no valid dtype, shape and data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ValueError(
                f"{path} is corrupt: tensor {name!r} ({dtype} {shape}) has byte range {offsets}, "
                f"which does not fit its shape"
            )
        tensors[name] = (dtype, tuple(shape))
        ranges.append((begin, end))
    covered = 0
    for begin, end in sorted(ranges):
        if begin != covered:
            raise ValueError(f"{path} is corrupt: its tensors overlap or leave a gap at byte {covered}")
        covered = end
    if covered != data_size:
        raise ValueError(
            f"{path} is truncated or padded: its tensors end at byte {covered} of the data, "
            f"the file holds {data_size}"
        )
    return tensors, metadata
