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
- :func:`launch`: ``wrap_triton(kernel)[grid](...)``, so the same launcher runs eagerly and traces
  (a plain ``kernel[grid](...)`` under the interpreter).
- :func:`scale_saved_grad`: the whole backward of the ops that write their gradient during forward.
- :func:`dot_precision`, :func:`sm_count`: the ``tl.dot`` precision per input dtype, grid sizing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
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
    Every ``tl.constexpr`` parameter that the configs do not set (``HAS_GRAD``, ``PRECISION``, ...)
    is added to the key: each of them compiles another variant, and a config tuned for one variant
    must not be reused for another. Triton adds the dtype of every tensor argument itself.
    """

    def wrap(fn: Callable) -> Callable:
        full_key = variant_key(fn, key, configs)
        tuned = triton.autotune(list([interpret] if INTERPRET else configs), key=full_key, **kwargs)(fn)
        tuned.hopper_configs = list(configs)
        return tuned

    return wrap


def variant_key(fn: Callable, key: Sequence[str], configs: Sequence[triton.Config]) -> list[str]:
    """``key`` followed by every constexpr parameter of the jitted ``fn`` that no config sets."""
    tuned = {name for cfg in configs for name in cfg.kwargs}
    return list(dict.fromkeys([*key, *(n for n in constexpr_names(fn) if n not in tuned)]))


def constexpr_names(fn: Callable) -> list[str]:
    """Names of the ``tl.constexpr`` parameters of a jitted (or interpreted) kernel, in order."""
    import inspect

    import triton.language as tl

    py_fn = fn
    while hasattr(py_fn, "fn"):  # JITFunction / InterpretedFunction / Autotuner wrap the function
        py_fn = py_fn.fn
    names = []
    for p in inspect.signature(py_fn).parameters.values():
        ann = p.annotation
        if ann is tl.constexpr or (isinstance(ann, str) and ann.split(".")[-1] == "constexpr"):
            names.append(p.name)
    return names


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
    """Launch ``kernel`` over ``grid`` eagerly or, inside a traced ``triton_op``, as a graph node.

    Triton launches on the current CUDA device and its stream, whatever device the pointers live
    on: an eager launch therefore runs under the device of the first tensor argument (a tensor on
    ``cuda:1`` would otherwise be read by a kernel running on ``cuda:0``). Under tracing the
    switch is harmless and the graph node carries the device; inductor's generated code sets it.
    """
    if INTERPRET:
        # The op is a plain custom op there (see define_op), never traced through the kernel; and
        # the interpreted kernel is not a JITFunction, which some torch releases' wrap_triton refuse.
        kernel[grid](*args, **kwargs)
        return
    device = launch_device(args)
    if device is None:
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    with torch.cuda.device(device):
        wrap_triton(kernel)[grid](*args, **kwargs)


def launch_device(args: Sequence[object]) -> torch.device | None:
    """The CUDA device of the first tensor in ``args``; None for CPU tensors (the interpreter) and
    for fake ones (a trace, which may run on a machine without a GPU)."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is None or tensor.device.type != "cuda" or is_fake(tensor):
        return None  # a fake tensor: a trace records the launch, nothing runs (no GPU needed)
    return tensor.device


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` on fp32 operands upcast from ``dtype``.

    fp16 and bf16 values are exact in tf32 (10 mantissa bits, 8 exponent bits), so their products
    run on the tensor cores at no loss; fp32 inputs need "ieee" to meet the 1e-5 tolerance.
    """
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device``: the Hopper count for CPU tensors under the interpreter and for
    fake CUDA tensors traced where no GPU is present."""
    if device.type == "cuda" and torch.cuda.is_available():
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
