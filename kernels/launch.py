"""Launch plumbing shared by every Triton op family: autotuning, op registration, dtypes, grid sizing.

Each kernel file (``tv.py``, ``stats.py``, ``repulsive.py``) holds its ``@triton.jit`` kernels, then
its ``*_forward`` / ``*_backward`` launchers, then the ``torch.library`` ops that wire the launchers
to autograd. What those files would otherwise repeat lives here:

- :func:`autotune`: the Hopper configurations on a GPU, one fixed configuration under
  ``TRITON_INTERPRET=1`` (autotuning there times numpy, which says nothing about a GPU). The full
  Hopper list stays on the kernel as ``hopper_configs`` for the ahead-of-time compile
  (:mod:`invcoss.kernels.aot`).
- :func:`define_op`: ``torch.library.triton_op`` when the kernels are compiled (torch.compile then
  sees the kernels themselves and needs no separate fake implementation), a plain custom op with an
  explicit fake implementation under the interpreter, where tracing the launcher with fake tensors
  would run the interpreted kernel on them.
- :func:`launch`: ``wrap_triton(kernel)[grid](...)``, so the same launcher runs eagerly and traces.
- :func:`scale_saved_grad`: the whole backward of the ops that write their gradient during forward.
- :func:`dot_precision`, :func:`sm_count`: the ``tl.dot`` precision per input dtype, grid sizing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
from torch.library import wrap_triton

# Read once, before any kernel is defined, from the knob triton.jit itself consults at definition time.
INTERPRET = bool(triton.knobs.runtime.interpret)

# Streaming multiprocessors of the target when no device can be asked (an H100/H200 SXM has 132).
HOPPER_SMS = 132


def autotune(
    configs: Sequence[triton.Config],
    key: Sequence[str],
    interpret: triton.Config,
    **kwargs: object,
) -> Callable:
    """``triton.autotune`` over ``configs`` on a GPU, or over the single ``interpret`` config.

    ``key`` names the arguments whose change triggers a new search. Keys are feature sizes (row
    length, feature dimension), never the batch size, so a new batch size reuses the tuned config.
    """

    def wrap(fn: Callable) -> Callable:
        tuned = triton.autotune(list([interpret] if INTERPRET else configs), key=list(key), **kwargs)(fn)
        tuned.hopper_configs = list(configs)
        return tuned

    return wrap


def config(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    """A ``triton.Config`` written flat: ``config(4, 3, BLOCK_B=32)``."""
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def define_op(
    name: str,
    fake: Callable,
    mutates_args: Sequence[str] = (),
) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the operator ``name`` (``"invcoss_triton::..."``); see the module doc."""

    def wrap(fn: Callable) -> Callable:
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))

    return wrap


def launch(kernel: Callable, grid: tuple | Callable, *args: object, **kwargs: object) -> None:
    """Launch ``kernel`` over ``grid`` eagerly or, inside a traced ``triton_op``, as a graph node."""
    wrap_triton(kernel)[grid](*args, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` on fp32 operands upcast from ``dtype``.

    fp16 and bf16 values are exact in tf32 (10 mantissa bits, 8 exponent bits), so their products
    run on the tensor cores at no loss; fp32 inputs need "ieee" to meet the 1e-5 tolerance.
    """
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (the Hopper count for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_SMS


def scale_saved_grad(grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Backward of an op whose forward already wrote its gradient: ``grad * grad_out``.

    ``grad_out`` is the upstream gradient, 0-dim for a scalar loss or ``(B,)`` for per-sample losses
    (broadcast over the trailing axes of ``grad``). One elementwise multiply in fp32, cast back to the
    input dtype: torch (or inductor, under torch.compile) runs it at memory bandwidth already.
    """
    scale = grad_out.to(torch.float32)
    if scale.ndim:
        scale = scale.view(-1, *([1] * (grad.ndim - 1)))
    return (grad.to(torch.float32) * scale).to(grad.dtype)
