"""Speed of the C++ CPU kernels against the eager torch reference, measured in one run (issue 4).

Usage::

    python benchmarks/cpu_ratios.py [--guard] [--repeats N] [--threads T]

For every row the eager reference and the fused ``backend="cpu"`` op run alternately in the same
process (so a busy machine slows both alike), fp32, forward and backward; the table shows the
medians, their ratio and an effective rate. ``--guard`` exits 1 when a ratio is below its entry
in :data:`THRESHOLDS`.

Effective rates: GB/s counts the bytes an op must move at least (x read once, and for the
differentiable ops its gradient written once), the same count for both columns; GFLOP/s for the
repulsive loss counts the matmul flops each implementation performs (the direct formula
4 B P D, the Gram path 2 B D^2).

The measured operations are plain functions (``tv_step``, ``stat_matching_step``,
``running_stats_eager``, ``running_stats_fused``, ``repulsive_direct_step``, ``repulsive_pool_step``)
and :func:`cases` builds the rows, so other benchmark suites import them instead of copying them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from invcoss import ops
from invcoss.ops import RepulsivePool, RunningStats

# Minimum speed-up of the fused CPU op over the eager reference (issue 4).
THRESHOLDS: dict[str, float] = {
    "total_variation 3D": 3.0,
    "total_variation 2D": 3.0,
    "stat_matching_loss": 2.0,
    "RunningStats.update": 1.5,
    "repulsive loss (RepulsivePool)": 10.0,
}


# ---- the measured operations ------------------------------------------------------------------------


def tv_step(x: torch.Tensor, backend: str) -> None:
    """Forward and backward of the mean total variation of x."""
    x.grad = None
    ops.total_variation(x, reduction="mean", backend=backend).backward()


def stat_matching_step(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, backend: str) -> None:
    """Forward and backward of the stat-matching loss of x ``(B, *F)``."""
    x.grad = None
    ops.stat_matching_loss(x, mean, var, backend=backend).backward()


@dataclass
class ChanState:
    """A running ``(count, mean, m2)`` in fp64, as RunningStats keeps it."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor


def running_stats_eager(state: ChanState, x: torch.Tensor) -> None:
    """The plain-torch way to fold a batch in: ``torch.var_mean`` in fp64, then Chan's merge."""
    xs = x.reshape(x.shape[0], -1).to(state.mean.dtype)
    var_b, mean_b = torch.var_mean(xs, dim=0, correction=0)
    n_b = xs.shape[0]
    n = state.count + n_b
    delta = mean_b - state.mean
    state.mean = state.mean + delta * (n_b / n)
    state.m2 = state.m2 + var_b * n_b + delta.square() * (state.count * n_b / n)
    state.count = n


def running_stats_fused(stats: RunningStats, x: torch.Tensor) -> None:
    """RunningStats.update on the stats' backend."""
    stats.update(x)


def repulsive_direct_step(h: torch.Tensor, pool_feats: torch.Tensor) -> None:
    """Forward and backward of Eq. 5 through the B x P similarity matrix (the eager formula)."""
    h.grad = None
    ops.repulsive_cosine_loss(h, pool_feats, backend="torch").backward()


def repulsive_pool_step(pool: RepulsivePool, h: torch.Tensor) -> None:
    """Forward and backward of RepulsivePool.loss (the Gram path once the pool holds P > D rows)."""
    h.grad = None
    pool.loss(h).backward()


# ---- the rows ---------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    shape: str
    eager: Callable[[], None]
    fused: Callable[[], None]
    eager_work: float  # bytes (GB/s) or flops (GFLOP/s) per call
    fused_work: float
    unit: str


def cases() -> list[Case]:
    """The rows of issue 4's table, inputs built (fp32, seeded)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for name, shape in (
        ("total_variation 3D", (4, 1, 16, 192, 192)),
        ("total_variation 2D", (32, 3, 224, 224)),
    ):
        x = torch.randn(shape, generator=g).requires_grad_()
        nbytes = 2 * x.numel() * x.element_size()
        out.append(
            Case(
                name,
                str(shape),
                lambda x=x: tv_step(x, "torch"),
                lambda x=x: tv_step(x, "cpu"),
                nbytes,
                nbytes,
                "GB/s",
            )
        )

    x = torch.randn(48, 145, 768, generator=g).requires_grad_()
    mean, var = torch.randn(145, 768, generator=g), torch.rand(145, 768, generator=g)
    nbytes = 2 * x.numel() * x.element_size()
    out.append(
        Case(
            "stat_matching_loss",
            "(48, 145, 768)",
            lambda: stat_matching_step(x, mean, var, "torch"),
            lambda: stat_matching_step(x, mean, var, "cpu"),
            nbytes,
            nbytes,
            "GB/s",
        )
    )

    xb = torch.randn(256, 197, 768, generator=g) * 2 + 5
    state = ChanState(
        0, torch.zeros(197 * 768, dtype=torch.float64), torch.zeros(197 * 768, dtype=torch.float64)
    )
    running_stats_eager(state, xb)
    stats = RunningStats((197, 768), backend="cpu")
    stats.update(xb)
    nbytes = xb.numel() * xb.element_size()
    out.append(
        Case(
            "RunningStats.update",
            "(256, 197, 768)",
            lambda: running_stats_eager(state, xb),
            lambda: running_stats_fused(stats, xb),
            nbytes,
            nbytes,
            "GB/s",
        )
    )

    B, P, D = 320, 16384, 768
    pool = RepulsivePool(P, D, backend="cpu")
    pool.push(torch.randn(P, D, generator=g))
    feats = pool.features()
    h = torch.randn(B, D, generator=g).requires_grad_()
    out.append(
        Case(
            "repulsive loss (RepulsivePool)",
            f"B={B}, P={P}, D={D}",
            lambda: repulsive_direct_step(h, feats),
            lambda: repulsive_pool_step(pool, h),
            4.0 * B * P * D,
            2.0 * B * D * D,
            "GFLOP/s",
        )
    )
    return out


def measure(case: Case, repeats: int) -> tuple[float, float]:
    """Median seconds of (eager, fused), alternating the two after one warm-up call each."""
    case.eager()
    case.fused()
    te, tf = [], []
    for _ in range(repeats):
        for fn, ts in ((case.eager, te), (case.fused, tf)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(te), statistics.median(tf)


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
    header = f"| {'op':<31}| {'shape':<22}| eager ms | fused ms | ratio  | need  | {'eager rate':<15}| {'fused rate':<15}|"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    failed = []
    for case in cases():
        te, tf = measure(case, args.repeats)
        ratio = te / tf
        need = THRESHOLDS[case.name]
        scale = 1e9
        rate_e = f"{case.eager_work / te / scale:6.2f} {case.unit}"
        rate_f = f"{case.fused_work / tf / scale:6.2f} {case.unit}"
        mark = "" if ratio >= need else " <"
        print(
            f"| {case.name:<31}| {case.shape:<22}| {te * 1e3:8.2f} | {tf * 1e3:8.2f} | {ratio:5.1f}x"
            f" | {need:4.1f}x | {rate_e:<15}| {rate_f:<15}|{mark}"
        )
        if ratio < need:
            failed.append(f"{case.name}: {ratio:.2f}x < {need:.1f}x")
    if args.guard and failed:
        print("below threshold: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
