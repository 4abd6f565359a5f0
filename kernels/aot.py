"""Ahead-of-time compile of every Triton kernel, in every autotune configuration, for Hopper (sm_90).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole
pipeline down to a cubin with the ptxas bundled with Triton, and ptxas reports the resources. Each
row of :func:`kernel_table` is one (kernel, variant, config): registers per thread, static shared
memory, spill bytes (stores + loads), and from the SASS (:mod:`invcoss.kernels.sass`) the number of
128-bit global loads and of tensor-core instructions. ``tests/ops/test_kernel_design.py`` holds the
expectations per kernel (zero spills everywhere), and ``invcoss-cli info --kernels`` prints the table.

Signatures are the ones the launchers produce on contiguous inputs: every pointer 16-byte aligned,
a unit stride specialised to the constant 1, and the integers a spec names as ``divisible`` marked
as multiples of 16, as the JIT does for such values. Kernels whose code depends on the
input dtype (the ``tl.dot`` precision) are compiled once per variant.

Under ``TRITON_INTERPRET=1`` the kernels of this process are interpreted functions, not compilable
ones, so :func:`kernel_table` compiles in a child process with the interpreter off.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

TARGET_ARCH = 90
TARGET_WARP_SIZE = 32


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant to compile: runtime argument types and fixed constexprs."""

    module: str  # kernels module holding the kernel
    attr: str  # the kernel's name in that module
    variant: str  # what distinguishes this signature (dtype, mode)
    types: dict[str, str]  # runtime arguments -> Triton type ("*fp32", "i32", "fp32")
    constexprs: dict[str, object] = field(default_factory=dict)  # fixed, including unit strides
    launch: dict[str, int] | None = None  # meta + num_warps/num_stages of an untuned kernel
    # Integer arguments the JIT sees as multiples of 16 on the usual shapes (it specialises those,
    # which is what lets strided rows compile to vector loads): compiled with the same hint.
    divisible: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelRow:
    """Resources of one compiled (kernel, variant, config)."""

    kernel: str
    variant: str
    config: str
    registers: int
    shared_bytes: int
    spill_bytes: int
    vector_loads: int = 0  # 128-bit global loads in the SASS (LDG.E.128)
    mma: int = 0  # tensor-core instructions in the SASS (HGMMA, HMMA)


def _ptrs(names: str, ty: str) -> dict[str, str]:
    return {n: f"*{ty}" for n in names.split()}


def _ints(names: str) -> dict[str, str]:
    return {n: "i32" for n in names.split()}


def _floats(names: str) -> dict[str, str]:
    return {n: "fp32" for n in names.split()}


def kernel_specs() -> list[KernelSpec]:
    """Every kernel of :mod:`invcoss.kernels` with the signatures its launchers use."""
    from invcoss.kernels import reduce, repulsive, stats, tv

    # The launcher's contiguous case: unit W stride, the other strides and W multiples of the
    # 16-byte vector (ALIGNED), int32 offsets unless a plane overflows them.
    tv_fixed = {"stride_w": 1, "GROUP_D": tv.GROUP_D, "GROUP_H": tv.GROUP_H, "GROUP_W": tv.GROUP_W}
    tv_ints = _ints("C D H W stride_b stride_c stride_d stride_h n_dg n_hg n_wg")
    tv_variants = [
        (x_ty, wide, aligned)
        for x_ty in ("fp32", "bf16")
        for wide, aligned in ((False, True), (False, False))
    ]
    tv_variants.append(("fp32", True, True))
    specs = []
    for x_ty, wide, aligned in tv_variants:
        variant = x_ty + (", int64 index" if wide else "") + ("" if aligned else ", unaligned")
        meta = {**tv_fixed, "VEC": 16 // (4 if x_ty == "fp32" else 2), "ALIGNED": aligned, "WIDE_INDEX": wide}
        specs += [
            KernelSpec(
                "tv",
                "tv_forward_kernel",
                variant,
                _ptrs("x_ptr", x_ty) | _ptrs("partial_ptr", "fp32") | tv_ints | _floats("w_d w_h w_w"),
                meta,
            ),
            KernelSpec(
                "tv",
                "tv_backward_kernel",
                variant,
                _ptrs("x_ptr grad_ptr", x_ty) | _ptrs("scale_ptr", "fp32") | tv_ints | _floats("w_d w_h w_w"),
                meta,
            ),
        ]
    specs += [
        KernelSpec(
            "reduce",
            "row_sum_kernel",
            "fp32",
            {**_ptrs("in_ptr out_ptr", "fp32"), **_ints("n_cols"), **_floats("scale")},
            {},
            reduce.ROW_SUM_LAUNCH,
        ),
    ]
    # ALIGNED: rows on 16 elements and F % 16 == 0 (vector loads along F); not: the scalar fallback.
    stats_variants = (
        ("fp32", "fp32", True),
        ("bf16", "fp32", True),
        ("fp32", "fp64", True),
        ("fp32", "fp32", False),
    )
    for x_ty, acc, aligned in stats_variants:
        specs.append(
            KernelSpec(
                "stats",
                "welford_partial_kernel",
                f"x {x_ty}, acc {acc}, " + ("aligned" if aligned else "unaligned"),
                {
                    **_ptrs("x_ptr", x_ty),
                    **_ptrs("mean_ptr m2_ptr", acc),
                    **_ints("N F stride_n rows_per_split"),
                },
                {"stride_f": 1, "ALIGNED": aligned},
            )
        )
    merge_types = _ints("n_splits rows_per_split N F count")
    for mode, acc, name in ((0, "fp32", "mean/var"), (1, "fp64", "update fp64"), (2, "fp32", "stat match")):
        specs.append(
            KernelSpec(
                "stats",
                "welford_merge_kernel",
                name,
                {**_ptrs("pmean_ptr pm2_ptr aux_a_ptr aux_b_ptr out_a_ptr out_b_ptr", acc)}
                | _ptrs("x_ptr out_c_ptr sq_ptr", "fp32")
                | merge_types,
                {"MODE": mode, "stride_f": 1},
                stats.MERGE_LAUNCH,
            )
        )
    specs += [
        KernelSpec(
            "stats",
            "stat_norms_kernel",
            "fp32",
            {**_ptrs("sq_ptr loss_ptr inv_ptr", "fp32"), **_ints("n_parts")},
            {},
            stats.NORMS_LAUNCH,
        ),
    ]
    for x_ty, aligned in (("fp32", True), ("bf16", True), ("fp32", False)):
        specs.append(
            KernelSpec(
                "stats",
                "batch_mean_var_backward_kernel",
                f"{x_ty}, " + ("aligned" if aligned else "unaligned"),
                {**_ptrs("x_ptr grad_ptr", x_ty), **_ptrs("mean_ptr gm_ptr gv_ptr coef_ptr", "fp32")}
                | _ints("N F stride_n"),
                {"stride_f": 1, "ALIGNED": aligned},
            )
        )
    # The launcher's variant for rows of a multiple of 16 elements (ALIGNED: vector loads, as the JIT
    # specialises D = 768), one tuning per dtype family.
    for ty, mma, grad in (
        ("fp32", False, True),
        ("bf16", True, True),
        ("bf16", True, False),
        ("fp16", True, True),
    ):
        specs.append(
            KernelSpec(
                "repulsive",
                "repulsive_direct_mma_kernel" if mma else "repulsive_direct_fp32_kernel",
                f"{ty}, {'mma' if mma else 'ieee'}" + ("" if grad else ", loss only"),
                {**_ptrs("h_ptr p_ptr", ty), **_ptrs("hinv_ptr pinv_ptr party_ptr partsq_ptr", "fp32")}
                | _ints("B P D chunk_len stride_hb stride_pp"),
                {
                    "stride_hd": 1,
                    "stride_pd": 1,
                    "HAS_GRAD": grad,
                    "MMA": mma,
                    "PRECISION": "ieee",
                    "ALIGNED": True,
                },
            )
        )
    for ty in ("fp32", "bf16"):
        specs.append(
            KernelSpec(
                "repulsive",
                "repulsive_direct_finish_kernel",
                ty,
                {**_ptrs("h_ptr grad_ptr", ty), **_ptrs("party_ptr partsq_ptr rowloss_ptr", "fp32")}
                | _ints("B D stride_hb n_chunks")
                | _floats("eps grad_scale"),
                {"stride_hd": 1, "HAS_GRAD": True, "ALIGNED": True},
                repulsive.DIRECT_FINISH_LAUNCH,
            )
        )
    specs.append(
        KernelSpec(
            "repulsive",
            "inv_norm_kernel",
            "bf16",
            {**_ptrs("x_ptr", "bf16"), **_ptrs("out_ptr", "fp32"), **_ints("R D stride_r"), **_floats("eps")},
            {"stride_d": 1, "ALIGNED": True},
            repulsive.INV_NORM_LAUNCH,
        )
    )
    specs += [
        KernelSpec(
            "repulsive",
            "gram_forward_kernel",
            "h fp32, G fp32",
            {
                **_ptrs("h_ptr g_ptr t_ptr quad_ptr hsq_ptr", "fp32"),
                **_ints("B D stride_hb stride_gm n_chunks"),
            },
            {"stride_hd": 1, "stride_gn": 1, "HAS_GRAD": True, "CHUNK_D": repulsive.GRAM_CHUNK_D},
        ),
        KernelSpec(
            "repulsive",
            "gram_finish_kernel",
            "fp32",
            {**_ptrs("h_ptr t_ptr quad_ptr hsq_ptr rowloss_ptr grad_ptr", "fp32")}
            | _ints("B D stride_hb n_chunks")
            | _floats("eps grad_scale"),
            {"stride_hd": 1, "HAS_GRAD": True},
            repulsive.FINISH_LAUNCH,
        ),
    ]
    for g_ty in ("fp32", "fp64"):
        specs.append(
            KernelSpec(
                "repulsive",
                "gram_update_kernel",
                f"G {g_ty}",
                {**_ptrs("f_ptr", "fp32"), **_ptrs("gram_ptr", g_ty), **_ints("K D stride_fk stride_gm")}
                | _floats("alpha"),
                {"stride_fd": 1, "stride_gn": 1},
            )
        )
    return specs


def _jit_function(spec: KernelSpec):
    """The spec's ``JITFunction`` and its Hopper configs (None for an untuned kernel)."""
    import importlib

    kernel = getattr(importlib.import_module(f"invcoss.kernels.{spec.module}"), spec.attr)
    configs = getattr(kernel, "hopper_configs", None)
    select = getattr(kernel, "variant_configs", None)  # the autotuner's pruning per variant
    if configs is not None and select is not None:
        configs = select(configs, _element_size(spec), spec.constexprs)
    return (kernel.fn if configs is not None else kernel), configs


def _element_size(spec: KernelSpec) -> int:
    """Bytes per element of the spec's first pointer argument (x's dtype for the launch pruning)."""
    ty = next(t for t in spec.types.values() if t.startswith("*"))
    return {"*fp64": 8, "*fp32": 4, "*bf16": 2, "*fp16": 2}.get(ty, 4)


def _config_items(spec: KernelSpec, configs) -> list[tuple[str, dict, dict]]:
    """``(label, meta constexprs, compile options)`` for every config of the spec."""
    if configs is None:
        meta = {k: v for k, v in spec.launch.items() if k not in ("num_warps", "num_stages")}
        opts = {"num_warps": spec.launch["num_warps"], "num_stages": spec.launch["num_stages"]}
        return [(_label(meta, opts), meta, opts)]
    items = []
    for cfg in configs:
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        items.append((_label(cfg.kwargs, opts), dict(cfg.kwargs), opts))
    return items


def _label(meta: dict, opts: dict) -> str:
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in meta.items())
    return f"{blocks} w{opts['num_warps']} s{opts['num_stages']}"


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(job: tuple[KernelSpec, str, dict, dict]) -> KernelRow:
    """Compile one (spec, config) for sm_90 and read its resources from the ptxas report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, label, meta, opts = job
    fn, _ = _jit_function(spec)
    constexprs = {**spec.constexprs, **meta}
    signature = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = spec.types[name]
            if signature[name].startswith("*") or name in spec.divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope():
        # A cache hit would skip ptxas and its report: compile afresh, with the report printed.
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src, target=GPUTarget("cuda", TARGET_ARCH, TARGET_WARP_SIZE), options=opts
            )
    report = log.getvalue()
    regs = _PTXAS_REGS.search(report)
    spills = _PTXAS_SPILLS.search(report)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas resource report for {spec.attr} [{label}]:\n{report}")
    from invcoss.kernels.sass import cubin_facts

    sass = cubin_facts(compiled.asm["cubin"])
    return KernelRow(
        kernel=spec.attr,
        variant=spec.variant,
        config=label,
        registers=int(regs.group(1)),
        shared_bytes=int(compiled.metadata.shared),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        vector_loads=sass.vector_loads,
        mma=sass.mma,
    )


def compile_all(workers: int | None = None) -> list[KernelRow]:
    """Compile every spec in every config in this process's kernels (which must not be interpreted)."""
    from invcoss.kernels.launch import INTERPRET

    if INTERPRET:
        raise RuntimeError("compile_all needs compilable kernels: run it with TRITON_INTERPRET unset")
    jobs = []
    for spec in kernel_specs():
        _, configs = _jit_function(spec)
        jobs += [(spec, label, meta, opts) for label, meta, opts in _config_items(spec, configs)]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    if workers == 1:
        return [_compile_one(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_one, jobs))


def start_kernel_table(workers: int | None = None) -> subprocess.Popen:
    """Start the compile of :func:`kernel_table` in a child process (interpreter off) and return it.

    ``workers`` bounds the child's compile processes (default: every core). The test suite starts
    it with one worker when the session begins, so the compile overlaps the tests that run on the
    other core; :func:`finish_kernel_table` collects the rows.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "invcoss.kernels.aot", "--json"]
    if workers:
        cmd += ["--workers", str(workers)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_kernel_table(proc: subprocess.Popen, timeout: float = 600.0) -> list[KernelRow]:
    """The rows of a compile started by :func:`start_kernel_table`.

    Raises:
        RuntimeError: the compile failed (with the end of its error output).
        subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds (it is killed).
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{err[-4000:]}")
    return [KernelRow(**row) for row in json.loads(out)]


def kernel_table(timeout: float = 600.0) -> list[KernelRow]:
    """Rows for every (kernel, variant, config), compiled for sm_90 (see the module doc)."""
    from invcoss.kernels.launch import INTERPRET

    if not INTERPRET:
        return compile_all()
    return finish_kernel_table(start_kernel_table(), timeout)


def format_kernel_table(rows: Sequence[KernelRow]) -> str:
    """A plain-text table of ``rows``: kernel, variant, config, registers, shared memory, spills."""
    from invcoss.kernels.sass import plain_table

    head = ("kernel", "variant", "config", "regs", "smem B", "spill B", "LDG.128", "MMA")
    body = [
        (r.kernel, r.variant, r.config, r.registers, r.shared_bytes, r.spill_bytes, r.vector_loads, r.mma)
        for r in rows
    ]
    title = f"Triton kernels compiled for sm_{TARGET_ARCH} ({len(rows)} configs)"
    return plain_table(title, head, body, text_columns=3)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else None
    rows = compile_all(workers)
    if "--json" in args:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(format_kernel_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
