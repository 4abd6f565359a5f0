"""The throughput targets of the fused kernels, and the run that measures them on this machine.

Usage::

    python -m invcoss.benchmark.targets [--threads T] [--reps N] [--quick] [--strict]

A target says how fast a fused backend must run one case, in one mode and dtype, against what was
measured *in the same run*: torch.compile of the eager reference (``x compile``), and the machine's
roofs: the copy bandwidth for the memory-bound ops, counting only the minimum traffic of the op
(:func:`~invcoss.benchmark.specs.work`), and the matmul rate for the repulsive direct path.

- :data:`CPU_TARGETS`: the C++ kernels on this CPU. The memory-bound rows (total variation 2D and
  3D, the Welford update, stat matching; forward and forward+backward, the paper's sizes included)
  at >= 1.5x torch.compile and >= 50% of the copy bandwidth; the matmul-bound repulsive direct path
  at least level with torch.compile.
- :data:`GPU_TARGETS`: the CUDA and Triton kernels, judged from the GPU check's records
  (:mod:`invcoss.benchmark.report` adds the table): total variation forward+backward, Welford and
  stat matching at >= 85% of the copy bandwidth on inputs at least 4x the 50-60 MB L2 and >= 1.5x
  torch.compile; the repulsive direct path in bf16 at >= 50% of the bf16 matmul rate for pools of
  16384 rows and more.

This script runs the CPU targets: eager, ``compile`` and ``cpu`` for each case, their calls in turn,
with the copy bandwidth timed just before and after each case's rounds (:func:`measure_round_robin`:
the ratios and percentages hold on a shared machine whose speed drifts), then prints one line per
target with its verdict; ``--strict`` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from invcoss.benchmark.specs import Case
from invcoss.benchmark.suite import Row


@dataclass(frozen=True)
class Target:
    """How fast the fused providers must run ``case`` in ``mode`` and ``dtype``.

    Each bound that is not None must hold: ``min_x_compile`` on the speed-up over torch.compile of
    the reference, ``min_copy_pct`` on the minimum traffic per second as a percentage of the copy
    roof, ``min_matmul_pct`` on the minimum flops per second as a percentage of the matmul roof.
    """

    case: Case
    mode: str
    dtype: str = "float32"
    min_x_compile: float | None = None
    min_copy_pct: float | None = None
    min_matmul_pct: float | None = None

    @property
    def label(self) -> str:
        return f"{self.case.name} {self.mode} {self.dtype}"

    def bounds(self) -> str:
        """The target in words: ``>= 1.5x compile, >= 50% copy``."""
        parts = []
        if self.min_x_compile is not None:
            parts.append(f">= {self.min_x_compile:g}x compile")
        if self.min_copy_pct is not None:
            parts.append(f">= {self.min_copy_pct:g}% copy")
        if self.min_matmul_pct is not None:
            parts.append(f">= {self.min_matmul_pct:g}% matmul")
        return ", ".join(parts)


def _memory_bound(cases: Sequence[Case], x_compile: float, copy_pct: float, modes=None) -> list[Target]:
    return [
        Target(case, mode, min_x_compile=x_compile, min_copy_pct=copy_pct)
        for case in cases
        for mode in (modes or case.modes)
    ]


CPU_TARGETS: tuple[Target, ...] = (
    *_memory_bound(
        [
            Case("tv", (32, 3, 224, 224)),
            Case("tv", (4, 1, 16, 192, 192)),
            Case("tv", (48, 1, 16, 192, 192), "paper"),
            Case("tv", (320, 3, 224, 224), "paper"),
            Case("welford", (256, 197, 768)),
            Case("stat_matching", (48, 145, 768)),
            Case("stat_matching", (320, 197, 768), "paper"),
        ],
        x_compile=1.5,
        copy_pct=50.0,
    ),
    Target(Case("repulsive_direct", (320, 1024, 768)), "fwd", min_x_compile=1.0),
    Target(Case("repulsive_direct", (320, 1024, 768)), "fwd+bwd", min_x_compile=1.0),
)

# Inputs of at least 4x the L2 (fp32: 240 MB and more), forward+backward where the op has a backward.
GPU_TARGETS: tuple[Target, ...] = (
    *_memory_bound(
        [Case("tv", (128, 1, 16, 192, 192), "large"), Case("tv", (512, 3, 224, 224), "large")],
        x_compile=1.5,
        copy_pct=85.0,
        modes=("fwd+bwd",),
    ),
    *_memory_bound(
        [Case("welford", (512, 197, 768)), Case("stat_matching", (512, 197, 768), "large")],
        x_compile=1.5,
        copy_pct=85.0,
    ),
    Target(Case("repulsive_direct", (320, 16384, 768)), "fwd", "bfloat16", min_matmul_pct=50.0),
    Target(Case("repulsive_direct", (320, 16384, 768)), "fwd+bwd", "bfloat16", min_matmul_pct=50.0),
    Target(Case("repulsive_direct", (320, 100_000, 768)), "fwd", "bfloat16", min_matmul_pct=50.0),
    Target(Case("repulsive_direct", (320, 100_000, 768)), "fwd+bwd", "bfloat16", min_matmul_pct=50.0),
)


def target_cases(targets: Sequence[Target]) -> list[Case]:
    """The distinct cases of ``targets``, in order (what a run must measure)."""
    return list(dict.fromkeys(t.case for t in targets))


@dataclass(frozen=True)
class Verdict:
    """One target judged for one fused provider: the measured values and whether the bounds hold."""

    target: Target
    provider: str
    median_ms: float | None
    x_compile: float | None
    copy_pct: float | None
    matmul_pct: float | None
    missing: str = ""  # why nothing could be judged (no row, no compile row, no roof)

    @property
    def passed(self) -> bool:
        t = self.target
        if self.missing:
            return False
        checks = [
            (t.min_x_compile, self.x_compile),
            (t.min_copy_pct, self.copy_pct),
            (t.min_matmul_pct, self.matmul_pct),
        ]
        return all(need is None or (got is not None and got >= need) for need, got in checks)


def judge(
    targets: Sequence[Target],
    rows: Sequence[Row],
    peaks: dict[str, float] | None,
    providers: Sequence[str],
    copy_roofs: Mapping[tuple[str, str, str], float] | None = None,
) -> list[Verdict]:
    """A :class:`Verdict` per target and fused provider, from rows with ratios filled in.

    ``rows`` come from :func:`~invcoss.benchmark.suite.add_ratios` (or the GPU check's records);
    ``peaks`` from :func:`~invcoss.benchmark.timing.measure_peaks` measured in the same run.
    ``copy_roofs`` (optional) maps ``(case, mode, dtype)`` to the copy bandwidth measured around
    that case's rows (:func:`measure_round_robin`); a row found there is judged against it instead
    of ``peaks["copy_gbps"]``.
    """
    by_key = {(r.case, r.mode, r.dtype, r.provider): r for r in rows}
    out = []
    for t in targets:
        for provider in providers:
            row = by_key.get((t.case.name, t.mode, t.dtype, provider))
            if row is None:
                out.append(Verdict(t, provider, None, None, None, None, missing="not measured"))
                continue
            missing = []
            if t.min_x_compile is not None and row.ratio_compile is None:
                missing.append("no compile row")
            if (t.min_copy_pct is not None or t.min_matmul_pct is not None) and not (peaks or copy_roofs):
                missing.append("no roofs")
            roof = (copy_roofs or {}).get((t.case.name, t.mode, t.dtype)) or (peaks or {}).get("copy_gbps")
            copy = 100 * row.gbps / roof if roof and row.gbps else None
            matmul = 100 * row.tflops / peaks["bf16_tflops"] if peaks and row.tflops else None
            out.append(
                Verdict(
                    t, provider, row.median_ms, row.ratio_compile, copy, matmul, missing="; ".join(missing)
                )
            )
    return out


def verdict_markdown(verdicts: Sequence[Verdict], peaks: dict[str, float] | None, title: str = "") -> str:
    """A Markdown table of verdicts, with the roofs they were measured against."""
    lines = [f"### {title}", ""] if title else []
    if peaks:
        around = (
            f" (median of the copies timed around each case's rows, {peaks['copy_gbps_min']:.1f}-"
            f"{peaks['copy_gbps_max']:.1f}; each row's % copy is against its own)"
            if "copy_gbps_min" in peaks
            else ""
        )
        lines += [
            f"Roofs measured in the same run: copy {peaks['copy_gbps']:.1f} GB/s{around}, matmul "
            f"{peaks['bf16_tflops']:.1f} TFLOP/s. Rates count the minimum traffic and flops of each op.",
            "",
        ]
    lines += [
        "| case | mode | dtype | provider | median ms | x compile | % copy | % matmul | target | met |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for v in verdicts:
        t = v.target
        met = "yes" if v.passed else ("no: " + v.missing if v.missing else "no")
        lines.append(
            f"| {t.case.name} | {t.mode} | {t.dtype} | {v.provider} | {fmt(v.median_ms, '.2f')} | "
            f"{fmt(v.x_compile, '.2f')} | {fmt(v.copy_pct, '.0f')} | {fmt(v.matmul_pct, '.0f')} | "
            f"{t.bounds()} | {met} |"
        )
    met = sum(v.passed for v in verdicts)
    lines += ["", f"{met} of {len(verdicts)} targets met."]
    return "\n".join(lines) + "\n"


# The copy roof measured around every case's rows on the CPU: 64 Mi fp32 values (512 MB moved per
# copy, beyond any L3 here), three timed copies after one untimed.
_ROOF_NUMEL = 1 << 26


def measure_round_robin(
    cases: Sequence[Case],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    progress=None,
    roof_numel: int | None = None,
) -> tuple[list[Row], dict[tuple[str, str, str], float]]:
    """Rows of every case and mode, the providers timed in turn, with the copy roof around them.

    Per case and mode, the providers' calls alternate (:func:`~invcoss.benchmark.timing.time_round_robin`,
    two untimed calls each first), so a machine that gets busier or quieter slows or speeds them
    alike and their ratios hold on a shared machine. Each timed call follows an untimed call of the
    same provider, so that an input that fits the caches is timed from them, as in a loop of steps
    (another provider's temporaries would otherwise have pushed it out). The copy bandwidth is
    measured just before and just after those rounds; their mean is the roof of those rows (what
    the machine could copy while they ran). ``roof_numel``: fp32 values per copy (default: 64 Mi
    on a CPU, 256 Mi on a GPU). Returns ``(rows, {(case, mode, dtype): GB/s})``.
    """
    from invcoss.benchmark.specs import build, make_inputs
    from invcoss.benchmark.suite import make_row
    from invcoss.benchmark.timing import copy_roof, time_round_robin

    dtype_name = str(dtype).removeprefix("torch.")
    numel = roof_numel or (_ROOF_NUMEL if device.type == "cpu" else (1 << 30) // 4)

    def roof() -> float:
        return copy_roof(device, numel, reps=3, warmup=1)["value"]

    rows: list[Row] = []
    roofs: dict[tuple[str, str, str], float] = {}
    for case in cases:
        inputs = make_inputs(case, device, dtype)
        for mode in case.modes:
            if progress:
                progress(f"{case.name} {mode}: {', '.join(providers)} in turn")
            before = roof()
            fns = [build(case, provider, mode, inputs) for provider in providers]
            times = time_round_robin(fns, device, reps, warmup=2, settle=1)
            roofs[(case.name, mode, dtype_name)] = (before + roof()) / 2
            rows += [make_row(case, p, mode, device, dtype, t) for p, t in zip(providers, times)]
        del inputs
    return rows, roofs


def run_cpu_targets(
    targets: Sequence[Target] = CPU_TARGETS, reps: int = 5, progress=None
) -> tuple[list[Verdict], dict[str, float], list[Row]]:
    """Measure every target case for eager, compile and cpu in turn (:func:`measure_round_robin`),
    with the roofs; judge the ``cpu`` rows. ``peaks["copy_gbps"]`` is the median of the copy roofs
    measured around the rows (each row is judged against its own), ``peaks["bf16_tflops"]`` the
    matmul rate measured first."""
    from invcoss.benchmark.suite import add_ratios
    from invcoss.benchmark.timing import matmul_roof

    device = torch.device("cpu")
    peaks = {"bf16_tflops": matmul_roof(device, 2048, torch.float32, max(3, reps), warmup=2)["value"]}
    rows: list[Row] = []
    copy_roofs: dict[tuple[str, str, str], float] = {}
    for dtype in sorted({t.dtype for t in targets}):
        cases = target_cases([t for t in targets if t.dtype == dtype])
        measured, roofs = measure_round_robin(
            cases, ["eager", "compile", "cpu"], device, getattr(torch, dtype), reps, progress
        )
        rows += measured
        copy_roofs |= roofs
    peaks["copy_gbps"] = statistics.median(copy_roofs.values())
    peaks["copy_gbps_min"], peaks["copy_gbps_max"] = min(copy_roofs.values()), max(copy_roofs.values())
    rows = add_ratios(rows)
    return judge(targets, rows, peaks, ["cpu"], copy_roofs), peaks, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--quick", action="store_true", help="skip the paper-size cases")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from invcoss import ops

    if "cpu" not in ops.available_backends():
        print(f"the cpu backend is not available: {ops.backend_status()['cpu'][1]}", file=sys.stderr)
        return 1
    targets = [t for t in CPU_TARGETS if not (args.quick and t.case.tag)]
    from invcoss.benchmark.guard import machine

    print(f"machine: {machine()}", flush=True)
    verdicts, peaks, _ = run_cpu_targets(
        targets, args.reps, progress=lambda s: print(f"  {s}", file=sys.stderr)
    )
    print(verdict_markdown(verdicts, peaks, "CPU targets"))
    return 1 if args.strict and not all(v.passed for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
