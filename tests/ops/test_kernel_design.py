"""Design guards: what the sm_90 machine code of every kernel must look like, checked without a GPU.

The Triton kernels are compiled for sm_90 in every autotune config (``kernels/aot.py``); the CUDA
kernels are read from the extension's sm_90 cubins (``kernels/sass.py``). For each kernel,
:data:`TRITON_DESIGN` and :data:`CUDA_DESIGN` say the register budget per thread and which variants
must issue 128-bit global loads (``LDG.E.128``: the bandwidth-bound kernels along their contiguous
axis) or tensor-core instructions (``HGMMA``/``HMMA``: the bf16 matmuls). Spills and local memory
are failures everywhere. A kernel without an entry fails too: a new kernel gets its design written
down here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from invcoss import _ext


@dataclass(frozen=True)
class Design:
    """What one kernel's machine code must show.

    ``vector_loads`` and ``mma`` are regular expressions over ``"<variant> | <config>"`` (the
    config is empty for CUDA rows): a compiled row they match must have at least one such
    instruction. None: no such requirement.
    """

    max_registers: int
    vector_loads: str | None = None
    mma: str | None = None

    def needs(self, pattern: str | None, label: str) -> bool:
        return pattern is not None and re.search(pattern, label) is not None


# Triton: the aligned variants (rows and strides on 16 bytes, the usual shapes) of the
# bandwidth-bound kernels load 16 bytes at a time, bf16 TV in its configs of eight values per thread
# (the only ones its autotuner runs for 16-bit inputs: kernels/tv.py, variant_configs, which the
# table compiles too); every 16-bit repulsive tile runs on the tensor cores (wgmma).
_TV_VECTOR = r"^fp32(, int64 index)? \||^bf16 \| (H=4 W=128 w2|H=8 W=128 w4) "
TRITON_DESIGN: dict[str, Design] = {
    "tv_forward_kernel": Design(96, vector_loads=_TV_VECTOR),
    "tv_backward_kernel": Design(160, vector_loads=_TV_VECTOR),
    "row_sum_kernel": Design(64),
    "welford_partial_kernel": Design(160, vector_loads=r", aligned \|"),
    "welford_merge_kernel": Design(64),
    "stat_norms_kernel": Design(64),
    "batch_mean_var_backward_kernel": Design(96, vector_loads=r", aligned \|"),
    "repulsive_direct_fp32_kernel": Design(160),
    "repulsive_direct_mma_kernel": Design(255, vector_loads=r"mma \|", mma=r""),
    "repulsive_direct_finish_kernel": Design(96, vector_loads=r""),
    "inv_norm_kernel": Design(64, vector_loads=r""),
    "gram_forward_kernel": Design(160),
    "gram_finish_kernel": Design(128),
    "gram_update_kernel": Design(255),
}

# CUDA: the template argument after the dtypes is the vector width of the bandwidth-bound kernels;
# every width above 1 (the path for 16-byte aligned rows) loads 16 bytes at a time. The matmuls of
# the CUDA direct path are cuBLAS calls, so no kernel of ours needs tensor-core instructions.
_VECTOR_WIDTH = r"^\w+, \w+, [248](, (true|false))? \|"
CUDA_DESIGN: dict[str, Design] = {
    "tv_sum_kernel": Design(64, vector_loads=_VECTOR_WIDTH),
    "tv_grad_kernel": Design(64, vector_loads=_VECTOR_WIDTH),
    "tv_finalize_kernel": Design(32),
    "col_partial_kernel": Design(160, vector_loads=_VECTOR_WIDTH),
    "batch_mean_var_backward_kernel": Design(96, vector_loads=_VECTOR_WIDTH),
    "batch_mean_var_kernel": Design(64),
    "welford_merge_kernel": Design(64),
    "stat_diff_kernel": Design(64),
    "stat_norms_kernel": Design(32),
    "stat_scale_kernel": Design(32),
    "scale_rows_kernel": Design(32),
    "cosine_tile_kernel": Design(80, vector_loads=_VECTOR_WIDTH),
    "epilogue_kernel": Design(96, vector_loads=_VECTOR_WIDTH),
    "inv_norm_kernel": Design(80, vector_loads=_VECTOR_WIDTH),
    "loss_kernel": Design(32),
    "normalise_rows_kernel": Design(64, vector_loads=_VECTOR_WIDTH),
}


def _check(kind: str, rows, design: dict[str, Design], stack_of) -> list[str]:
    problems = []
    for r in rows:
        rule = design.get(r.kernel)
        label = f"{r.variant} | {getattr(r, 'config', '')}"
        where = f"{kind} {r.kernel} [{label}]"
        if rule is None:
            problems.append(f"{where}: no design entry")
            continue
        if stack_of(r):
            problems.append(f"{where}: {stack_of(r)} bytes of spills / local memory")
        if r.registers > rule.max_registers:
            problems.append(f"{where}: {r.registers} registers > {rule.max_registers}")
        if rule.needs(rule.vector_loads, label) and r.vector_loads == 0:
            problems.append(f"{where}: no 128-bit global load (LDG.E.128)")
        if rule.needs(rule.mma, label) and r.mma == 0:
            problems.append(f"{where}: no tensor-core instruction (HGMMA/HMMA)")
    return problems


def test_triton_kernels_keep_their_design(kernel_rows):
    problems = _check("triton", kernel_rows, TRITON_DESIGN, lambda r: r.spill_bytes)
    assert not problems, "\n".join(problems)


def test_every_design_entry_names_a_compiled_kernel(kernel_rows):
    # A renamed kernel must not leave a stale rule behind that guards nothing.
    assert set(TRITON_DESIGN) == {r.kernel for r in kernel_rows}


@pytest.fixture(scope="module")
def cuda_rows():
    if _ext.C is None:
        pytest.skip(f"invcoss._C is not built: {_ext.IMPORT_ERROR}")
    if not _ext.HAS_CUDA:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        from tests.ops.test_build import _cuda_missing

        why_not = _cuda_missing(torch.version.cuda, CUDA_HOME)
        if why_not:
            pytest.skip(f"setup.py builds no CUDA kernels here: {why_not}")
        pytest.fail("the toolchain for the CUDA kernels exists but invcoss._C was built without them")
    from invcoss.kernels.sass import extension_table

    rows = extension_table()
    assert rows, "invcoss._C has CUDA kernels but no sm_90 code (TORCH_CUDA_ARCH_LIST must include 9.0)"
    return rows


def test_cuda_kernels_keep_their_design(cuda_rows):
    problems = _check("cuda", cuda_rows, CUDA_DESIGN, lambda r: r.stack_bytes + r.local_ops)
    assert not problems, "\n".join(problems)


def test_every_cuda_design_entry_names_a_built_kernel(cuda_rows):
    assert set(CUDA_DESIGN) == {r.kernel for r in cuda_rows}


def test_a_lost_vector_load_or_a_spill_is_caught():
    # The guard itself: rows that break each rule are reported, a conforming row is not.
    from invcoss.kernels.aot import KernelRow

    design = {"k": Design(64, vector_loads=r"^fp32 ", mma=r"^bf16 ")}
    good = [
        KernelRow("k", "fp32", "c", 40, 0, 0, vector_loads=2),
        KernelRow("k", "bf16", "c", 40, 0, 0, mma=4),
    ]
    assert _check("t", good, design, lambda r: r.spill_bytes) == []
    bad = [
        KernelRow("k", "fp32", "c", 40, 0, 0, vector_loads=0),
        KernelRow("k", "bf16", "c", 40, 0, 0, mma=0),
        KernelRow("k", "fp16", "c", 65, 0, 8),
        KernelRow("other", "fp32", "c", 10, 0, 0),
    ]
    found = _check("t", bad, design, lambda r: r.spill_bytes)
    assert [p.split(": ", 1)[1] for p in found] == [
        "no 128-bit global load (LDG.E.128)",
        "no tensor-core instruction (HGMMA/HMMA)",
        "8 bytes of spills / local memory",
        "65 registers > 64",
        "no design entry",
    ]
