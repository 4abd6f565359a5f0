"""Rows: every case timed for every provider and mode, with the speed-ups between them.

One *row* is a :class:`~invcoss.benchmark.specs.Case` timed for one provider in one mode (``fwd``
or ``fwd+bwd``) and one dtype. Providers run in the same process on the same inputs, so the ratios
between them are meaningful on a noisy machine even when the absolute times are not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from invcoss.benchmark.providers import providers_for
from invcoss.benchmark.specs import Case, build, make_inputs, work
from invcoss.benchmark.timing import time_calls


@dataclass
class Row:
    """One measurement; ``ratio_eager`` and ``ratio_compile`` are filled by :func:`add_ratios`."""

    case: str
    # The op (tv, stat_matching, welford, repulsive_direct, repulsive_pool): ``Case.op``, under the
    # name the committed result tables and the GPU check's records have always used for it.
    family: str
    shape: str
    provider: str
    mode: str
    device: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float | None = None
    tflops: float | None = None
    nbytes: float | None = None  # the minimum traffic of one call (see :func:`~invcoss.benchmark.specs.work`)
    flops: float | None = None
    ratio_eager: float | None = None
    ratio_compile: float | None = None
    extra: dict = field(default_factory=dict)


def cpu_cases(full: bool = True) -> list[Case]:
    """The CPU sweep: the extension's design shapes plus the paper's, sized for a 2-core machine."""
    cases = [
        Case("tv", (4, 1, 16, 192, 192)),
        Case("tv", (32, 3, 224, 224)),
        Case("stat_matching", (48, 145, 768)),
        Case("welford", (256, 197, 768)),
        Case("repulsive_pool", (320, 16384, 768)),
        Case("repulsive_direct", (320, 1024, 768)),
    ]
    if full:
        cases += [
            Case("tv", (48, 1, 16, 192, 192), "paper"),
            Case("stat_matching", (320, 197, 768), "paper"),
            Case("repulsive_pool", (320, 100_000, 768), "paper"),
        ]
    return cases


def gpu_cases() -> list[Case]:
    """The GPU sweep: the paper's shapes and larger, pool sizes 10^3 to 10^5."""
    return [
        Case("tv", (48, 1, 16, 192, 192), "paper"),
        Case("tv", (320, 3, 224, 224), "paper"),
        Case("stat_matching", (48, 145, 768), "paper"),
        Case("stat_matching", (320, 197, 768), "paper"),
        Case("welford", (320, 197, 768)),
        Case("repulsive_direct", (320, 1024, 768)),
        Case("repulsive_direct", (320, 16384, 768)),
        Case("repulsive_direct", (320, 100_000, 768)),
        Case("repulsive_pool", (320, 16384, 768)),
        Case("repulsive_pool", (320, 100_000, 768)),
    ]


def cases_for(device: torch.device | str, quick: bool = False) -> list[Case]:
    """The sweep of ``device``: :func:`cpu_cases` (without the paper's sizes when ``quick``) or :func:`gpu_cases`."""
    return cpu_cases(full=not quick) if torch.device(device).type == "cpu" else gpu_cases()


def make_row(
    case: Case, provider: str, mode: str, device: torch.device, dtype: torch.dtype, times_ms: list[float]
) -> Row:
    """A :class:`Row` from raw times (median, 20th and 80th percentiles, GB/s or TFLOP/s)."""
    qs = statistics.quantiles(times_ms, n=5) if len(times_ms) > 1 else [times_ms[0]] * 4
    med = statistics.median(times_ms)
    nbytes, flops = work(case, mode, torch.empty((), dtype=dtype).element_size())
    return Row(
        case=case.name,
        family=case.op,
        shape="x".join(map(str, case.shape)),
        provider=provider,
        mode=mode,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        median_ms=med,
        p20_ms=qs[0],
        p80_ms=qs[3],
        gbps=nbytes / med / 1e6 if nbytes else None,
        tflops=flops / med / 1e9 if flops else None,
        nbytes=nbytes,
        flops=flops,
    )


def add_ratios(rows: list[Row]) -> list[Row]:
    """Fill each row's speed-up against eager and torch.compile of the same case, mode and dtype."""
    base = {(r.case, r.mode, r.dtype, r.provider): r.median_ms for r in rows}
    for r in rows:
        eager = base.get((r.case, r.mode, r.dtype, "eager"))
        comp = base.get((r.case, r.mode, r.dtype, "compile"))
        r.ratio_eager = eager / r.median_ms if eager else None
        r.ratio_compile = comp / r.median_ms if comp else None
    return rows


def measure_rows(
    cases: Sequence[Case],
    providers: Sequence[str],
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    reps: int,
    progress: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[Row, list[float]]]:
    """Time each case in each dtype, mode and provider, in that order; yields ``(row, times_ms)``.

    Inputs are made when a case's first row starts and dropped after its last, so a caller that
    stops early (``stop()`` true before a row) builds nothing more.
    """
    for case in cases:
        for dtype in dtypes:
            inputs = None
            for mode in case.modes:
                for provider in providers:
                    if stop is not None and stop():
                        return
                    if progress:
                        progress(f"{case.name} {mode} {provider}")
                    if inputs is None:
                        inputs = make_inputs(case, device, dtype)
                    fn = build(case, provider, mode, inputs)
                    warmup = 2 if provider == "compile" else 1
                    times = time_calls(fn, device, reps, warmup)
                    yield make_row(case, provider, mode, device, dtype, times), times
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_suite(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: list[Case] | None = None,
    providers: list[str] | None = None,
    reps: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Time every case for every provider and mode; returns rows with ratios filled in."""
    device = torch.device(device)
    cases = cases if cases is not None else cases_for(device)
    providers = providers or providers_for(device)
    return add_ratios([row for row, _ in measure_rows(cases, providers, device, [dtype], reps, progress)])


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
