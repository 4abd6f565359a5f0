"""One op, one name in every layer (SPEC section 1, STYLE point 2).

The backend contract (the functions of ``invcoss.ops.backend_torch``), the compiled ops
(``torch.ops.invcoss``) and the Triton ops (``torch.ops.invcoss_triton``) use the same names, and every
op family has its files under the same stem in ``kernels/`` and ``csrc/``, its benchmark suite and its
tests.
docs/op-names.md maps the older names to these.
"""

import inspect
from pathlib import Path

import pytest
import torch

from invcoss import _ext
from invcoss.ops import backend_ext, backend_torch, backend_triton

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("tv", "stats", "repulsive")
CONTRACT = {
    "tv",
    "batch_mean_var",
    "welford_update",
    "stat_matching",
    "repulsive_direct",
    "repulsive_gram",
    "gram_update",
}
# Registered beside the contract ops for their autograd formulas: the backward of tv and of
# batch_mean_var and stat_matching (both namespaces) and the scaling of a gradient written during the
# forward pass (the extension's repulsive ops; the Triton ops do that multiply in plain torch).
HELPERS = {
    "invcoss": {"tv_backward", "batch_mean_var_backward", "scale_rows"},
    "invcoss_triton": {"tv_backward", "batch_mean_var_backward"},
}


def _registered(namespace: str) -> set[str]:
    prefix = f"{namespace}::"
    return {n[len(prefix) :] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


def test_the_torch_reference_defines_the_contract():
    defined = {
        name
        for name, fn in vars(backend_torch).items()
        if inspect.isfunction(fn) and fn.__module__ == backend_torch.__name__ and not name.startswith("_")
    }
    assert defined == CONTRACT


@pytest.mark.parametrize("module", [backend_ext, backend_triton], ids=lambda m: m.__name__)
def test_every_backend_implements_the_contract_under_its_names(module):
    missing = {name for name in CONTRACT if not callable(getattr(module, name, None))}
    assert not missing, f"{module.__name__} lacks {sorted(missing)}"


@pytest.mark.parametrize("namespace", ["invcoss", "invcoss_triton"])
def test_registered_ops_carry_the_contract_names(namespace):
    # The extension registers its ops when invcoss._C loads; the Triton ops register when the kernel
    # modules are imported (backend_triton imports them).
    if namespace == "invcoss" and _ext.C is None:
        pytest.skip(f"invcoss._C is not built: {_ext.IMPORT_ERROR}")
    assert _registered(namespace) == CONTRACT | HELPERS[namespace]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_op_family_has_its_files_under_one_stem(family):
    files = [f"kernels/{family}.py", f"csrc/{family}_cpu.cpp", f"csrc/{family}_cuda.cu"]
    files += [f"benchmarks/bench_{family}.py", f"tests/ops/test_{family}.py"]
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"op family {family!r} lacks {missing}"
