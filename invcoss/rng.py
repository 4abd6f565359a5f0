"""Library calls leave the caller's global random state as they found it.

Training seeds torch's global generator (the MAE masks its patches with ``torch.rand``), which
would otherwise reset the random stream of whoever called it. :func:`keeps_global_rng` runs a
function inside :func:`torch.random.fork_rng` over the CPU generator and every CUDA device's: the
function sees exactly the random numbers it always saw, and the caller's state is restored after,
whether the function returns or raises.

Example:
    >>> @keeps_global_rng
    ... def noisy():
    ...     torch.manual_seed(123)
    ...     return torch.rand(1)
    >>> before = torch.get_rng_state()
    >>> _ = noisy()
    >>> torch.equal(before, torch.get_rng_state())
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def keeps_global_rng(fn: F) -> F:
    """Decorate ``fn`` so that its changes to the global RNG states do not outlive the call."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
