"""Backend registry and dispatch for :mod:`invcoss.ops`.

Every op family has four implementations behind the same public names:

======== ============================== ===================================================
backend  runs on                        module
======== ============================== ===================================================
torch    any device (the reference)     ``invcoss.ops.backend_torch``
triton   CUDA (CPU via TRITON_INTERPRET) ``invcoss.ops.backend_triton`` over ``invcoss.kernels``
cpu      CPU tensors                    ``invcoss.ops.backend_ext`` over ``invcoss._C``
cuda     CUDA tensors                   ``invcoss.ops.backend_ext`` over ``invcoss._C``
======== ============================== ===================================================

A backend module implements this contract (the public layer has already validated shapes,
devices and dtypes, flattened features, rejected empty batches and handled empty pools; backends
trust their caller).
"fp32" below means the accumulation and result dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for
fp64 inputs on the backends that take fp64 (torch, cpu), so that gradcheck is exact there.

``tv(x, weights) -> Tensor``
    x: ``(B, C, *S)`` with 2 or 3 spatial axes, any strides; weights: tuple of one float per
    spatial axis. Returns the per-sample weighted anisotropic L1 sums, shape ``(B,)``, fp32,
    differentiable in x with sign(0) = 0.
``batch_mean_var(x) -> (mean, var)``
    x: ``(N, F)``. Column mean and biased variance in fp32, shape ``(F,)``, differentiable.
``welford_update(x, count, mean, m2) -> (mean, m2)``
    Folds the batch x ``(N, F)`` into a running state of ``count`` samples (Chan et al.), with
    ``mean`` and ``m2`` (sum of squared deviations) of shape ``(F,)`` in the state dtype (fp32 or
    fp64). Returns new state tensors; no autograd.
``stat_matching(x, mean, var) -> Tensor``
    x: ``(N, F)``, mean/var: ``(F,)``. ``||mean_N(x) - mean||_2 + ||var_N(x) - var||_2`` as a 0-dim
    fp32 tensor, differentiable in x (a zero norm has a zero gradient).
``repulsive_direct(h, pool, eps, pool_inv_norm=None) -> Tensor``
    h: ``(B, D)``, pool: ``(P, D)`` with P >= 1 (not necessarily normalised), pool_inv_norm: the pool
    rows' ``1 / max(|p_j|, eps)`` ``(P,)`` fp32 when the caller keeps them (``RepulsivePool``; the
    backend then neither copies nor renormalises the pool), else None. Eq. 5 as a 0-dim fp32
    tensor, differentiable in h only.
``repulsive_gram(h, gram, count, eps) -> Tensor``
    h: ``(B, D)``, gram: ``(D, D)`` = sum of the outer products of ``count`` normalised pool rows.
    The same value as ``repulsive_direct``, in O(B D^2), differentiable in h only.
``gram_update(gram, feats_hat, alpha) -> None``
    In place ``gram += alpha * feats_hat^T feats_hat`` for feats_hat ``(K, D)`` (alpha = +1 on push,
    -1 on eviction).

The compiled ops (``torch.ops.invcoss``) and the Triton ops (``torch.ops.invcoss_triton``) are
registered under these same names, in files named after the op family (``tv``, ``stats``,
``repulsive``): ``kernels/<family>.py``, ``csrc/<family>_cpu.cpp``, ``csrc/<family>_cuda.cu``. Both
namespaces add ``tv_backward`` (the backward of ``tv``, which recomputes the gradient from x) and
``batch_mean_var_backward`` (the backward of ``batch_mean_var`` and ``stat_matching``), and the
extension ``scale_rows`` (the backward of the repulsive ops, which write their gradient during the
forward pass; the Triton ops do that multiply in plain torch).

``INVCOSS_BACKEND`` overrides the default choice (``backend=None``); an explicit ``backend=``
argument overrides both.

Meta tensors (``device="meta"``) and fake tensors (``FakeTensorMode``, ``torch.compile``,
``torch.export``) carry shapes and no values. Every backend takes meta tensors: the torch backend
runs its plain PyTorch code on them, the compiled and Triton ops their registered fake kernels (the
same shapes, dtypes and autograd wiring as on real tensors). ``backend=None`` on meta tensors picks
what it picks on CPU tensors. Fake tensors report the device they stand for and dispatch as such.
"""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

BACKEND_NAMES = ("torch", "triton", "cpu", "cuda")


@dataclass(frozen=True)
class BackendInfo:
    """What the registry knows about one backend."""

    name: str
    module: str
    devices: tuple[str, ...]
    probe: Callable[[], str | None]  # None when available, else why not and how to get it
    install_hint: str


def _probe_triton() -> str | None:
    try:
        import triton
    except Exception as exc:  # pragma: no cover - triton ships with CUDA builds of torch
        return f"triton cannot be imported ({exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy

        reason = interpreter_incompatibility(triton.__version__, numpy.__version__)
        if reason is not None:
            return reason
    elif not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return _probe_module("invcoss.ops.backend_triton")


def _release(version: str) -> tuple[int, ...]:
    """``"3.6.0+git"`` -> ``(3, 6, 0)``: the leading numeric fields of a version string."""
    fields = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        fields.append(int(digits))
    return tuple(fields)


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None.

    Triton's interpreter before 3.7 turns a loop bound into a Python int with ``int()`` of a
    one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"): every kernel with a loop over a runtime bound fails. Compiled kernels (on a
    GPU) are not affected.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"TRITON_INTERPRET=1 needs numpy<2.4 with triton {triton_version} (numpy {numpy_version} "
            "is installed; triton>=3.7 works with any numpy)"
        )
    return None


def _probe_ext(device: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        from invcoss import _ext

        if _ext.C is None:
            return f"the extension invcoss._C is not available: {_ext.IMPORT_ERROR}"
        if device == "cuda" and not _ext.HAS_CUDA:
            return "invcoss._C was built without CUDA kernels (needs nvcc and a CUDA build of torch)"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return _probe_module("invcoss.ops.backend_ext")

    return probe


def _probe_module(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except Exception as exc:
        return f"{name} failed to import: {type(exc).__name__}: {exc}"
    return None


_REGISTRY: dict[str, BackendInfo] = {
    "torch": BackendInfo("torch", "invcoss.ops.backend_torch", ("cpu", "cuda", "meta"), lambda: None, ""),
    "triton": BackendInfo(
        "triton",
        "invcoss.ops.backend_triton",
        ("cuda", "cpu", "meta"),
        _probe_triton,
        "install triton (it ships with CUDA builds of torch) and run on a CUDA device",
    ),
    "cpu": BackendInfo(
        "cpu",
        "invcoss.ops.backend_ext",
        ("cpu", "meta"),
        _probe_ext("cpu"),
        "build the extension: pip install --no-build-isolation -e .",
    ),
    "cuda": BackendInfo(
        "cuda",
        "invcoss.ops.backend_ext",
        ("cuda", "meta"),
        _probe_ext("cuda"),
        "build the extension with nvcc and a CUDA build of torch: pip install --no-build-isolation -e .",
    ),
}

# Probed once, when invcoss.ops is imported (see probe_all): the dispatch on the hot path, and under
# torch.compile, is then dictionary lookups only.
_status_cache: dict[str, str | None] = {}
_modules: dict[str, ModuleType] = {}


def probe_all() -> None:
    """(Re)probe every backend and import the available ones.

    Runs at ``import invcoss.ops``; call it again after changing ``TRITON_INTERPRET`` or building
    the extension in a running process.
    """
    _status_cache.clear()
    _modules.clear()
    for name, info in _REGISTRY.items():
        _status_cache[name] = info.probe()
        if _status_cache[name] is None:
            _modules[name] = importlib.import_module(info.module)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if not _status_cache:
        probe_all()
    return _status_cache[name]


def backend_status() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend, for ``invcoss-cli info``."""
    out = {}
    for name in BACKEND_NAMES:
        reason = unavailable_reason(name)
        out[name] = (reason is None, reason or "available")
    return out


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [n for n in BACKEND_NAMES if unavailable_reason(n) is None]


def default_backend(device: torch.device) -> str:
    """The backend ``backend=None`` picks for tensors on ``device``.

    ``INVCOSS_BACKEND`` wins when set; otherwise CUDA tensors get ``triton``, then ``cuda``, then
    ``torch``; CPU (and meta) tensors get ``cpu`` (the C++ extension), then ``torch``.
    """
    env = os.environ.get("INVCOSS_BACKEND")
    if env:
        return env
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        if unavailable_reason(name) is None:
            return name
    return "torch"


def resolve(backend: str | None, device: torch.device, op: str) -> ModuleType:
    """The backend module that runs ``op`` on tensors of ``device``.

    Raises:
        ValueError: unknown backend name, or an available backend that does not run on ``device``.
        RuntimeError: the backend is known but not available here (the message says why and
            how to get it).
    """
    name = backend if backend is not None else default_backend(device)
    if name not in _REGISTRY:
        src = "backend" if backend is not None else "INVCOSS_BACKEND"
        raise ValueError(f"{op}: unknown {src} {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    info = _REGISTRY[name]
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(
            f"{op}: backend {name!r} is not available: {reason}. To get it: {info.install_hint}"
        )
    if device.type not in info.devices:
        raise ValueError(
            f"{op}: backend {name!r} runs on {'/'.join(info.devices)} tensors, got tensors on {device.type}"
        )
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{op}: backend 'triton' runs on CPU tensors only with TRITON_INTERPRET=1")
    return _modules[name]
