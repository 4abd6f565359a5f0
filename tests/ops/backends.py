"""The test device and the backends every op test runs on (the fixtures are in conftest.py).

``INVCOSS_TEST_DEVICE`` picks the tensors' device: ``cpu`` (the default: the ``torch``, ``cpu`` and
``triton`` backends, Triton through ``TRITON_INTERPRET=1``) or ``cuda`` (a GPU machine with
``TRITON_INTERPRET=0``: ``torch``, ``cuda`` and ``triton``; the GPU check runs the tests marked
``device`` this way). Shapes stay small on CPU tensors (the interpreter runs one program at a time
in numpy); the large ones run on CUDA only.

The backend list is not filtered by what is available: a backend that is missing here (the
extension did not build, Triton does not import) fails every test of it, with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from invcoss import ops

DEVICE = os.environ.get("INVCOSS_TEST_DEVICE") or "cpu"
ON_CUDA = DEVICE == "cuda"
EXT = "cuda" if ON_CUDA else "cpu"  # the extension's backend for the test device
BACKENDS = ["torch", EXT, "triton"]
FP64_BACKENDS = ["torch", EXT]  # Triton accumulates fp64 inputs in fp32: no exact mode
KERNEL_BACKENDS = [EXT, "triton"]  # the fused ones (the torch backend is the reference itself)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHORT = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}  # test ids


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs through the Triton interpreter here (then shapes stay small)."""
    return backend == "triton" and not ON_CUDA


def backend_dtypes(backends: list[str] | None = None, dtypes: list[torch.dtype] | None = None) -> list:
    """``(backend, dtype)`` parameters: every pair a backend supports (fp64 only where exact)."""
    out = []
    for b in backends or BACKENDS:
        for d in dtypes or DTYPES:
            if d == torch.float64 and b not in FP64_BACKENDS:
                continue
            out.append(pytest.param(b, d, id=f"{b}-{SHORT[d]}"))
    return out


def sizes(small: list, large: list = ()) -> list:
    """``small`` shapes everywhere, and ``large`` ones only on CUDA tensors."""
    return list(small) + (list(large) if ON_CUDA else [])


def shape_layouts(small: list, large: list = ()) -> list:
    """``(shape, layout)`` parameters: ``small`` shapes in every layout, ``large`` ones (CUDA only)
    contiguous, so that a GPU run stays within its minute (their float64 references run on the CPU)."""
    params = [pytest.param(s, lay, id=f"{lay}-{s}") for s in small for lay in LAYOUTS]
    return params + [pytest.param(s, "contiguous", id=f"contiguous-{s}") for s in sizes([], large)]


def backend_module(backend: str, device: str = DEVICE):
    """The module of ``backend`` that implements the backend contract on ``device``."""
    return ops.dispatch.resolve(backend, torch.device(device), "test")


LAYOUTS = ["contiguous", "padded", "transposed"]


def make(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
    scale=1.0,
    shift=0.0,
):
    """``randn * scale + shift`` of ``shape`` on the test device, in one of three memory layouts.

    ``padded``: rows longer than the last axis (a row stride that is not the width);
    ``transposed``: every axis reversed in memory (the last axis has the largest stride).
    """
    if layout == "contiguous":
        base = torch.randn(shape, dtype=torch.float64)
    elif layout == "padded":
        base = torch.randn(*shape[:-1], shape[-1] + 5, dtype=torch.float64)
    else:
        base = torch.randn(shape[::-1], dtype=torch.float64)
    base = (base * scale + shift).to(device=DEVICE, dtype=dtype)  # rounded once, in its final layout
    if layout == "padded":
        return base[..., : shape[-1]]
    if layout == "transposed":
        return base.permute(*reversed(range(len(shape))))
    return base


def steps(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values on a 0.5 grid: exact in every dtype, and equal neighbours exercise sign(0) = 0."""
    return (torch.randint(-4, 5, shape) * 0.5).to(device=DEVICE, dtype=dtype)


# The Triton ops run interpreted on CPU tensors, where AOT dispatch has nothing to compile.
TRITON_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def opcheck_cases(cases: list) -> pytest.MarkDecorator:
    """Parametrise a test over ``(backend, op name, args factory)`` cases, backend indirect."""
    return pytest.mark.parametrize(
        "backend, name, args", cases, indirect=["backend"], ids=[f"{b}-{n}" for b, n, _ in cases]
    )


def opcheck(backend: str, name: str, args: tuple) -> None:
    """``torch.library.opcheck`` of the op ``name`` of ``backend``: schema, fake kernel, autograd
    registration (and for the extension's ops, AOT dispatch)."""
    if backend == "triton":
        torch.library.opcheck(
            getattr(torch.ops.invcoss_triton, name).default, args, test_utils=TRITON_OPCHECK
        )
    else:
        torch.library.opcheck(getattr(torch.ops.invcoss, name).default, args)


def assert_same_bits_with_1_and_2_threads(run) -> None:
    """``run()`` returns the same tensors, bit for bit, with 1 and 2 OpenMP threads (and the
    extension's OpenMP regions really run on that many)."""
    from invcoss import _ext

    saved = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            assert _ext.C.omp_threads() == (n if _ext.BUILD_INFO["openmp"] else 1)
            results.append(run())
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
