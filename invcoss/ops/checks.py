"""Input validation shared by the public ops (the boundary; backends trust their callers)."""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

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


NONFINITE_POLICIES = ("raise", "skip")


def check_nonfinite(op: str, nonfinite: object) -> str:
    """Raise ValueError unless ``nonfinite`` is one of :data:`NONFINITE_POLICIES`."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{op} expects nonfinite in {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite  # type: ignore[return-value]


def check_int(op: str, name: str, value: object, minimum: int) -> int:
    """``value`` as an int; TypeError unless it is an integer, ValueError below ``minimum``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{op} expects {name} to be an int, got {type(value).__name__}")
    out = operator.index(value)  # type: ignore[arg-type]
    if out < minimum:
        raise ValueError(f"{op} expects {name} >= {minimum}, got {out}")
    return out


def check_positive_float(op: str, name: str, value: object) -> float:
    """``value`` as a float; ValueError unless it is a finite number > 0."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{op} expects {name} to be a number, got {type(value).__name__}") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{op} expects {name} to be a finite number > 0, got {value!r}")
    return out


def check_nonempty(op: str, name: str, t: Tensor, want: str) -> None:
    """Raise ValueError when ``t`` has no element (an empty batch, or a zero-length axis)."""
    if t.numel() == 0:
        raise ValueError(
            f"{op} expects {name} of shape {want} with no zero-length axis, got {shape_str(t.shape)}"
        )


def has_values(t: Tensor) -> bool:
    """Whether ``t`` holds values the host can read: False for meta and fake tensors (shapes only)."""
    return not t.is_meta and not is_fake(t)
