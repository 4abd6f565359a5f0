"""What the sm_90 machine code of our kernels does: registers, spills, vector loads, tensor-core ops.

A GPU is not needed. The Triton kernels are compiled for sm_90 by :mod:`invcoss.kernels.aot`; the
CUDA kernels of ``invcoss._C`` are in the extension's fat binary (``TORCH_CUDA_ARCH_LIST`` includes
9.0). ``cuobjdump`` (shipped with Triton's NVIDIA backend, or from the CUDA toolkit) disassembles
either into SASS, the instructions the GPU runs, and reports each function's resources.

What is counted (:class:`SassFacts`), per function:

- ``vector_loads``: 128-bit global loads (``LDG.E.128``, with any modifier such as ``.CONSTANT``),
  four fp32 or eight bf16 values per instruction: what a bandwidth-bound kernel needs to keep
  enough bytes in flight.
- ``mma``: tensor-core instructions, ``HGMMA`` (Hopper's warpgroup MMA, from ``wgmma``) and ``HMMA``
  (``mma.sync``). A bf16 matmul without them runs on the FMA units at a tenth of the rate or less.
- ``local_ops``: local-memory loads and stores (``LDL``/``STL``): register spills (or a stack
  array), each one a round trip to memory.

``invcoss-cli info --kernels`` prints the tables; ``tests/ops/test_kernel_design.py`` holds the
expectations per kernel, so that a design regression (a lost vector load, a spill, a matmul that
falls off the tensor cores) fails ``make test``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TARGET_ARCH = "sm_90"

_VECTOR_LOAD = re.compile(r"\bLDG\.E(?:\.[A-Z0-9_]+)*?\.128\b")
_MMA = re.compile(r"\bH(?:G)?MMA\b")
_LOCAL = re.compile(r"\b(?:LDL|STL)\b")
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"^arch = (sm_\d+)\s*$", re.M)

_TYPE_NAMES = {
    "float": "fp32",
    "double": "fp64",
    "c10::BFloat16": "bf16",
    "c10::Half": "fp16",
    "unsigned int": "u32",
    "int": "i32",
    "long": "i64",
    "bool": "bool",
}


@dataclass(frozen=True)
class SassFacts:
    """Instruction counts of one function's SASS (see the module doc)."""

    vector_loads: int
    mma: int
    local_ops: int


@dataclass(frozen=True)
class CudaKernelRow:
    """One CUDA kernel instantiation of the extension, compiled for :data:`TARGET_ARCH`."""

    kernel: str  # the function's name, e.g. "tv_forward_kernel"
    variant: str  # its template arguments, short type names: "fp32, fp32, u32"
    registers: int
    stack_bytes: int  # local memory per thread: spills and stack arrays
    shared_bytes: int
    vector_loads: int
    mma: int
    local_ops: int


def cuobjdump() -> str:
    """Path of a ``cuobjdump`` executable: Triton's bundled one, else the CUDA toolkit's.

    Raises:
        FileNotFoundError: none is installed.
    """
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "bin" / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError(
        "cuobjdump not found (it ships with triton's NVIDIA backend and the CUDA toolkit)"
    )


def facts(sass: str) -> SassFacts:
    """Count the instructions of :class:`SassFacts` in the SASS text of one function."""
    return SassFacts(
        vector_loads=len(_VECTOR_LOAD.findall(sass)),
        mma=len(_MMA.findall(sass)),
        local_ops=len(_LOCAL.findall(sass)),
    )


def cubin_facts(cubin: bytes) -> SassFacts:
    """:class:`SassFacts` of a single-kernel cubin (as ``triton.compile`` returns it)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True, check=True)
    return facts(out.stdout)


def _demangle(names: Sequence[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    return lines if len(lines) == len(names) else list(names)


def split_name(demangled: str) -> tuple[str, str]:
    """``("tv_forward_kernel", "fp32, fp32")`` from ``void ns::tv_forward_kernel<float, float>(...)``.

    The name is the last ``::`` component outside template brackets, before the argument list; the
    variant is its template argument list with short type names.
    """
    demangled = demangled.replace("(anonymous namespace)", "anon")
    depth, end = 0, len(demangled)
    for i, ch in enumerate(demangled):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0:
            end = i
            break
    head = demangled[:end].removeprefix("void ").strip()
    lt = head.find("<")
    base, args = (head, "") if lt < 0 else (head[:lt], head[lt + 1 : head.rfind(">")])
    name = base.rsplit("::", 1)[-1]
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch == "<"
        depth -= ch == ">"
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return name, ", ".join(_TYPE_NAMES.get(p, p) for p in parts)


def extension_path() -> Path:
    """The built ``invcoss._C`` shared object.

    Raises:
        FileNotFoundError: the extension is not built.
    """
    import invcoss

    built = sorted(Path(invcoss.__file__).parent.glob("_C.*.so")) + sorted(
        Path(invcoss.__file__).parent.glob("_C.so")
    )
    if not built:
        raise FileNotFoundError("invcoss._C is not built (pip install --no-build-isolation -e .)")
    return built[0]


def extension_table(path: str | Path | None = None, arch: str = TARGET_ARCH) -> list[CudaKernelRow]:
    """One row per CUDA kernel instantiation in the extension's ``arch`` code (empty without CUDA)."""
    path = str(path or extension_path())
    tool = cuobjdump()
    usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    if usage.returncode != 0:
        if "does not contain" in usage.stderr or "no fatbin" in usage.stderr.lower():
            return []
        raise RuntimeError(f"cuobjdump failed on {path}: {usage.stderr.strip()}")
    resources = {}
    # Each "Fatbin elf code" section names its arch; keep the functions of the requested one.
    for section in usage.stdout.split("Fatbin elf code:")[1:]:
        found = _ARCH.search(section)
        if found is None or found.group(1) != arch:
            continue
        for m in _RESOURCES.finditer(section):
            resources[m.group(1)] = tuple(int(v) for v in m.group(2, 3, 4, 5))
    sass = subprocess.run(
        [tool, "--dump-sass", "-arch", arch, path], capture_output=True, text=True, check=True
    )
    bodies = {}
    marks = list(_FUNCTION.finditer(sass.stdout))
    for m, nxt in zip(marks, [*marks[1:], None]):
        bodies[m.group(1)] = sass.stdout[m.end() : nxt.start() if nxt else len(sass.stdout)]
    mangled = sorted(resources)
    rows = []
    for raw, pretty in zip(mangled, _demangle(mangled)):
        regs, stack, shared, local = resources[raw]
        kernel, variant = split_name(pretty)
        f = facts(bodies.get(raw, ""))
        rows.append(
            CudaKernelRow(kernel, variant, regs, stack + local, shared, f.vector_loads, f.mma, f.local_ops)
        )
    return sorted(rows, key=lambda r: (r.kernel, r.variant))


def plain_table(title: str, head: Sequence[str], body: Sequence[Sequence[object]], text_columns: int) -> str:
    """A plain-text table (rich would wrap it when piped): the first ``text_columns`` columns
    left-aligned, the numbers after them right-aligned, a rule under the header."""
    lines = [tuple(head), *(tuple(str(c) for c in line) for line in body)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        cells = (c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        return "  ".join(cells)

    return "\n".join([title, fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def format_extension_table(rows: Sequence[CudaKernelRow]) -> str:
    """A plain-text table of :func:`extension_table` rows."""
    head = ("kernel", "variant", "regs", "stack B", "smem B", "LDG.128", "MMA", "LDL/STL")
    body = [
        (r.kernel, r.variant, r.registers, r.stack_bytes, r.shared_bytes, r.vector_loads, r.mma, r.local_ops)
        for r in rows
    ]
    title = f"CUDA kernels of invcoss._C for {TARGET_ARCH} ({len(rows)} instantiations)"
    return plain_table(title, head, body, text_columns=2)
