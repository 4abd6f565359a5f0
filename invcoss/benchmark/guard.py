"""Speed of the C++ CPU kernels against the eager torch reference, measured in one run.

Usage::

    python benchmarks/cpu_ratios.py [--guard] [--repeats N] [--threads T]

For every row the eager reference and the fused ``backend="cpu"`` op run alternately in the same
process (so a busy machine slows both alike), fp32, forward and backward; the table shows the
medians, their ratio and an effective rate. ``--guard`` exits 1 when a ratio is below its entry
in :data:`THRESHOLDS`.

The rows are cases of the benchmark specs (:mod:`invcoss.benchmark.specs`), built by
:func:`~invcoss.benchmark.specs.build` like every other benchmark row. Effective rates: GB/s counts
the bytes an op must move at least (:func:`~invcoss.benchmark.specs.work`: forward+backward reads x
twice and writes its gradient once), the same count for both columns; GFLOP/s for the repulsive
loss counts the matmul flops each implementation performs (the direct formula 4 B P D, the Gram
path 2 B D^2).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from invcoss import ops
from invcoss.benchmark.specs import Case, build, make_inputs, work
from invcoss.benchmark.timing import time_round_robin

# Minimum speed-up of the fused CPU op over the eager reference.
THRESHOLDS: dict[str, float] = {
    "total_variation 3D": 3.0,
    "total_variation 2D": 3.0,
    "stat_matching_loss": 2.0,
    "RunningStats.update": 1.5,
    "repulsive loss (RepulsivePool)": 10.0,
}


@dataclass(frozen=True)
class GuardRow:
    """One row of the guard: a case in one mode, and how its rates are counted.

    ``unit`` is ``GB/s`` (the case's minimum bytes for both columns) or ``GFLOP/s`` (its flops; the
    eager column counts those of ``reference_op`` when the reference computes another algorithm).
    """

    name: str  # the op column, and the key of THRESHOLDS
    case: Case
    mode: str = "fwd+bwd"
    label: str = ""  # the shape column; default: the case's shape
    unit: str = "GB/s"
    reference_op: str | None = None

    @property
    def shape(self) -> str:
        return self.label or str(self.case.shape)

    def rates(self, eager_s: float, fused_s: float) -> tuple[float, float]:
        """(eager, fused) rates in GB/s or GFLOP/s of calls taking these many seconds (fp32)."""
        k = 0 if self.unit == "GB/s" else 1
        fused_work = work(self.case, self.mode, 4)[k]
        eager_case = Case(self.reference_op, self.case.shape) if self.reference_op else self.case
        eager_work = work(eager_case, self.mode, 4)[k]
        return eager_work / eager_s / 1e9, fused_work / fused_s / 1e9


GUARD_ROWS: tuple[GuardRow, ...] = (
    GuardRow("total_variation 3D", Case("tv", (4, 1, 16, 192, 192))),
    GuardRow("total_variation 2D", Case("tv", (32, 3, 224, 224))),
    GuardRow("stat_matching_loss", Case("stat_matching", (48, 145, 768))),
    # The state in fp64, as RunningStats keeps it by default (the suites time an fp32 state).
    GuardRow(
        "RunningStats.update",
        Case("welford", (256, 197, 768), "fp64-state", options=(("state_dtype", torch.float64),)),
        mode="fwd",
    ),
    # The eager side is the direct formula through the B x P similarity matrix; the fused side
    # RepulsivePool.loss, the Gram path once the pool holds P > D rows.
    GuardRow(
        "repulsive loss (RepulsivePool)",
        Case("repulsive_pool", (320, 16384, 768)),
        label="B=320, P=16384, D=768",
        unit="GFLOP/s",
        reference_op="repulsive_direct",
    ),
)


@dataclass(frozen=True)
class GuardResult:
    """The medians of one guard row and what they imply."""

    row: GuardRow
    eager_s: float
    fused_s: float
    need: float

    @property
    def ratio(self) -> float:
        return self.eager_s / self.fused_s

    @property
    def passed(self) -> bool:
        return self.ratio >= self.need


def measure_guard(
    rows: Sequence[GuardRow] = GUARD_ROWS,
    repeats: int = 15,
    backend: str = "cpu",
    thresholds: dict[str, float] = THRESHOLDS,
) -> Iterator[GuardResult]:
    """Time each row, eager and fused alternating after one untimed call each; yields as measured."""
    device = torch.device("cpu")
    for row in rows:
        inputs = make_inputs(row.case, device, torch.float32)
        eager = build(row.case, "eager", row.mode, inputs)
        fused = build(row.case, backend, row.mode, inputs)
        te, tf = time_round_robin([eager, fused], device, repeats, warmup=1)
        yield GuardResult(row, statistics.median(te) / 1e3, statistics.median(tf) / 1e3, thresholds[row.name])
        del inputs, eager, fused


def failures(results: Sequence[GuardResult]) -> list[str]:
    """One line per result below its threshold, e.g. ``stat_matching_loss: 1.80x < 2.0x``."""
    return [f"{r.row.name}: {r.ratio:.2f}x < {r.need:.1f}x" for r in results if not r.passed]


HEADER = f"| {'op':<31}| {'shape':<22}| eager ms | fused ms | ratio  | need  | {'eager rate':<15}| {'fused rate':<15}|"


def table_head() -> str:
    """The table's header and rule."""
    rule = "|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|"
    return f"{HEADER}\n{rule}"


def table_line(r: GuardResult) -> str:
    """One line of the table; a trailing ``<`` marks a ratio below its threshold."""
    rate_e, rate_f = r.row.rates(r.eager_s, r.fused_s)
    rate_e_s, rate_f_s = f"{rate_e:6.2f} {r.row.unit}", f"{rate_f:6.2f} {r.row.unit}"
    mark = "" if r.passed else " <"
    return (
        f"| {r.row.name:<31}| {r.row.shape:<22}| {r.eager_s * 1e3:8.2f} | {r.fused_s * 1e3:8.2f} | "
        f"{r.ratio:5.1f}x | {r.need:4.1f}x | {rate_e_s:<15}| {rate_f_s:<15}|{mark}"
    )


def machine() -> str:
    """CPU model, core count, threads, torch version and the load when the run started."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{name} ({os.cpu_count()} CPUs), {torch.get_num_threads()} threads, torch {torch.__version__}{load}"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit status 1 with ``--guard`` when a ratio is below its threshold.

    Exit status 1 also when the ``cpu`` backend is not available; 0 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--guard", action="store_true", help="exit 1 when a ratio is below its threshold")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per side (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cpu" not in ops.available_backends():
        print(f"the cpu backend is not available: {ops.backend_status()['cpu'][1]}", file=sys.stderr)
        return 1

    print(f"machine: {machine()}")
    print(table_head())
    results = []
    for result in measure_guard(repeats=args.repeats):
        print(table_line(result), flush=True)
        results.append(result)
    failed = failures(results)
    if args.guard and failed:
        print("below threshold: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
