"""Trace every compiled Triton op (``TRITON_INTERPRET=0``) on fake CUDA tensors, with no GPU.

Run as a script by ``test_traced_kernels.py`` in a fresh process (the kernels read
``TRITON_INTERPRET`` when they are defined). Each op goes through ``aot_export_module``, the
functionalising trace ``torch.compile`` uses, so its ``triton_op`` decomposes into the kernel
launches that inductor would compile: the launchers run on fake tensors there (no data pointers, no
device queries, no device switch), and torch's kernel wrapper reads every kernel's Triton IR (for
sm_90, through a stand-in driver) to tell which arguments it writes. Prints one JSON object: per
dtype and op, the kernels launched, the arguments each kernel writes, the op nodes left over and
the inputs the graph mutates; or the error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import triton
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode


class HopperTarget:
    """The one call torch's kernel analysis makes of Triton's driver: the compile target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        out = self.fn(*inputs)
        return tuple(out) if isinstance(out, tuple | list) else (out,)


def jit_function(kernel):
    """The ``JITFunction`` under autotuners (torch wraps a pruned kernel in an autotuner of its own)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def kernel_names() -> dict[int, str]:
    """``id(JITFunction) -> its function's name`` for the kernels of the kernel modules (the two
    repulsive direct kernels tune one function: their launches differ by ``MMA``)."""
    import importlib

    names = {}
    for module in ("tv", "stats", "repulsive", "reduce"):
        for name, obj in vars(importlib.import_module(f"invcoss.kernels.{module}")).items():
            if name.endswith("_kernel"):
                jit = jit_function(obj)
                names[id(jit)] = jit.fn.__name__
    return names


def cases(dtype: torch.dtype) -> dict:
    ops = torch.ops.invcoss_triton
    cuda = dict(device="cuda")
    x = torch.empty(2, 1, 8, 16, 16, dtype=dtype, **cuda)
    h = torch.empty(20, 64, dtype=dtype, **cuda)
    pool = torch.empty(48, 64, dtype=dtype, **cuda)
    vec = lambda: torch.empty(64, **cuda)  # noqa: E731
    return {
        "tv": (lambda x: ops.tv(x, [1.0, 1.0, 1.0]), (x,)),
        "tv_backward": (lambda x, s: ops.tv_backward(x, [1.0, 1.0, 1.0], s), (x, torch.empty(2, **cuda))),
        "batch_mean_var": (ops.batch_mean_var, (h,)),
        "batch_mean_var_backward": (
            ops.batch_mean_var_backward,
            (h, vec(), vec(), vec(), torch.empty(2, **cuda)),
        ),
        "welford_update": (
            lambda h, m, v: ops.welford_update(h, 5, m, v),
            (h, vec().double(), vec().double()),
        ),
        "stat_matching": (ops.stat_matching, (h, vec(), vec())),
        "repulsive_direct": (lambda h, p: ops.repulsive_direct(h, p, 1e-8, True), (h, pool)),
        "repulsive_direct_loss": (lambda h, p: ops.repulsive_direct(h, p, 1e-8, False), (h, pool)),
        "repulsive_gram": (
            lambda h, g: ops.repulsive_gram(h, g, 32, 1e-8, True),
            (h, torch.empty(64, 64, **cuda)),
        ),
        "gram_update": (
            lambda g, f: ops.gram_update(g, f, 0.5),
            (torch.empty(64, 64, **cuda), torch.empty(16, 64, **cuda)),
        ),
    }


def trace(fn, inputs, names: dict[int, str]) -> dict:
    gm, signature = aot_export_module(Call(fn), inputs, trace_joint=False)
    launches, left = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            name = names.get(id(jit_function(kernel)), repr(kernel))
            if "MMA" in node.kwargs["kwargs"]:
                name += " mma" if node.kwargs["kwargs"]["MMA"] else " fp32"
            launches.append([name, sorted(node.kwargs.get("tensors_to_clone", []))])
        elif "invcoss" in str(node.target):
            left.append(str(node.target))
    return {"launches": launches, "left": left, "mutated": sorted(signature.user_inputs_to_mutate.values())}


def main() -> None:
    triton.runtime.driver.set_active(HopperTarget())
    from invcoss.kernels import launch

    import invcoss.ops.backend_triton  # noqa: F401  (registers the ops)

    names = kernel_names()
    report = {"interpret": launch.INTERPRET, "torch": torch.__version__, "triton": triton.__version__}
    for dtype in (torch.float32, torch.bfloat16):
        with FakeTensorMode(allow_non_fake_inputs=True):
            for name, (fn, inputs) in cases(dtype).items():
                try:
                    report[f"{name} {str(dtype).removeprefix('torch.')}"] = trace(fn, inputs, names)
                except Exception as exc:
                    report[f"{name} {str(dtype).removeprefix('torch.')}"] = {
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:],
                    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    # Set here, not at import: pytest's --doctest-modules imports this file into the test process,
    # whose kernels must stay interpreted. Triton reads it when the kernels are defined, in main().
    os.environ["TRITON_INTERPRET"] = "0"
    main()
