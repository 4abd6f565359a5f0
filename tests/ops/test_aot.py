"""Every Triton kernel, in every configuration its autotuner can pick, compiles for Hopper (sm_90).

No GPU needed: ``invcoss.kernels.aot`` runs ``triton.compile`` down to a cubin with the bundled ptxas
and reads registers, shared memory and spills from its report. A spill is a failure (it turns a
bandwidth-bound kernel into a local-memory-bound one). The table is printed (``pytest -s``) and is
what ``invcoss-cli info --kernels`` shows.
"""

import importlib
import inspect

import pytest
from invcoss.kernels import aot

KERNEL_MODULES = ("tv", "stats", "repulsive", "reduce")


@pytest.fixture
def rows(kernel_rows):
    return kernel_rows


def _kernels_defined():
    """Every jit kernel object defined in the kernel modules, by name, with its Hopper configs."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    found = {}
    for mod_name in KERNEL_MODULES:
        module = importlib.import_module(f"invcoss.kernels.{mod_name}")
        for name, obj in vars(module).items():
            # Nested @triton.jit helpers (leading underscore) compile inside their callers.
            if isinstance(obj, KernelInterface) and not name.startswith("_"):
                found[name] = obj.hopper_configs if isinstance(obj, Autotuner) else None
    return found


def test_every_kernel_in_every_config_compiles_without_spills(rows):
    print()
    print(aot.format_kernel_table(rows))
    assert rows
    spilled = [r for r in rows if r.spill_bytes]
    assert not spilled, f"register spills on sm_90: {spilled}"
    for r in rows:
        assert 0 < r.registers <= 255, r
        assert r.shared_bytes <= 227 * 1024, r  # Hopper's opt-in shared memory per block


def test_table_covers_every_kernel_and_config(rows):
    # Every config the autotuner can pick for a variant: all of them, or the kernel's own subset
    # per variant (variant_configs, which its early_config_prune applies at launch).
    defined = _kernels_defined()
    assert set(defined) == {r.kernel for r in rows}
    for spec in aot.kernel_specs():
        configs = defined[spec.attr]
        if configs is None:
            continue
        select = getattr(
            getattr(importlib.import_module(f"invcoss.kernels.{spec.module}"), spec.attr),
            "variant_configs",
            None,
        )
        if select is not None:
            configs = select(configs, aot._element_size(spec), spec.constexprs)
        labels = {
            aot._label(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages})
            for c in configs
        }
        compiled = {r.config for r in rows if r.kernel == spec.attr and r.variant == spec.variant}
        assert compiled == labels, (
            f"{spec.attr} [{spec.variant}]: compiled {compiled}, autotuner has {labels}"
        )


def test_specs_name_real_arguments():
    # Each spec types exactly the kernel's runtime arguments (a typo would compile something else).
    for spec in aot.kernel_specs():
        fn, configs = aot._jit_function(spec)
        fixed = set(spec.constexprs) | set((spec.launch or {}).keys())
        if configs:
            fixed |= set(configs[0].kwargs)
        params = set(inspect.signature(fn.fn).parameters)
        assert set(spec.types) | (fixed - {"num_warps", "num_stages"}) == params, spec.attr


def test_format_kernel_table_layout():
    row = aot.KernelRow("k", "fp32", "B=1 w4 s2", 40, 0, 0, 6, 2)
    lines = aot.format_kernel_table([row]).splitlines()
    assert lines[0].startswith("Triton kernels compiled for sm_90 (1 configs)")
    assert lines[1].split() == [
        "kernel",
        "variant",
        "config",
        "regs",
        "smem",
        "B",
        "spill",
        "B",
        "LDG.128",
        "MMA",
    ]
    assert lines[3].split() == ["k", "fp32", "B=1", "w4", "s2", "40", "0", "0", "6", "2"]
