"""Who a benchmark row is timed for: the eager reference, ``torch.compile`` of it, or a fused backend."""

from __future__ import annotations

import torch

from invcoss import ops

# The providers that run the eager torch reference (plainly, or compiled); every other provider is a
# fused backend of :mod:`invcoss.ops`.
REFERENCE_PROVIDERS = ("eager", "compile")


def kernel_backends(device: torch.device | str) -> list[str]:
    """The fused backends available here that run on ``device`` (cpu; or triton and cuda).

    Example:
        >>> set(kernel_backends("cpu")) <= {"cpu"}
        True
    """
    kernels = ("cpu",) if torch.device(device).type == "cpu" else ("triton", "cuda")
    return [b for b in kernels if b in ops.available_backends()]


def providers_for(device: torch.device | str) -> list[str]:
    """eager and compile of the reference, then every kernel backend that runs on ``device``."""
    return [*REFERENCE_PROVIDERS, *kernel_backends(device)]
