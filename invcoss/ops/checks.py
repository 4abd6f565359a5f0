"""Input validation shared by the public ops (the boundary; backends trust their callers)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t: object) -> Tensor:
    """Raise TypeError unless ``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op} expects {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op} expects {name} of a floating dtype (fp16, bf16, fp32, fp64), got {t.dtype}")
    return t


def check_same_device(op: str, ref_name: str, ref: Tensor, name: str, t: Tensor) -> None:
    """Raise ValueError when two tensors live on different devices."""
    if t.device != ref.device:
        raise ValueError(
            f"{op} expects {name} on the same device as {ref_name} ({ref.device}), got {t.device}"
        )


def shape_str(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
