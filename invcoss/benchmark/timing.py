"""Timing: wall clock (synchronised on CUDA), CUDA events after an L2 flush, round-robin, the roofs.

Every timer returns milliseconds per call and never asserts anything about them: the benchmarks
compare times measured in the same run (ratios), never absolute ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def time_fn(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Wall times in ms of ``reps`` calls after ``warmup`` calls (synchronising on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# Bytes zeroed between timed GPU calls: several times the 50-60 MB L2 of an H100/H200, so every
# timed call starts with its inputs in HBM (as triton.testing.do_bench does).
L2_FLUSH_BYTES = 256 << 20


def time_cuda(
    fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1, flush: bool = True
) -> list[float]:
    """Device times in ms of ``reps`` calls, from CUDA events, each after an L2 flush.

    Events bracket each call on the stream, so the times are what the GPU spent (host launch
    overhead shows only when it starves the GPU); the flush (a 256 MB memset, outside the events)
    evicts the inputs from L2 so each call reads them from HBM.
    """
    cache = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush else None
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        if cache is not None:
            cache.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_calls(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Times in ms of ``reps`` calls: CUDA events after an L2 flush on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        return time_cuda(fn, device, reps, warmup)
    return time_fn(fn, device, reps, warmup)


def time_round_robin(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    reps: int,
    warmup: int = 1,
    before_round: Callable[[int], None] | None = None,
    settle: int = 0,
) -> list[list[float]]:
    """Wall times in ms of ``reps`` rounds in which each of ``fns`` runs once, in turn.

    After ``warmup`` untimed calls of each, the functions alternate, so a machine getting busier
    slows them all alike and their ratio holds on a noisy machine. With ``settle`` > 0, each timed
    call comes right after that many untimed calls of the same function in the same round: its
    inputs are back in the caches, as in a loop that calls it again and again, whatever the other
    functions did to the caches. ``before_round(i)`` is called before round ``i`` (0-based).
    Returns one list of times per function.

    Example:
        >>> calls = []
        >>> times = time_round_robin([lambda: calls.append("a"), lambda: calls.append("b")],
        ...                          torch.device("cpu"), reps=2, warmup=1)
        >>> "".join(calls), [len(t) for t in times]
        ('ababab', [2, 2])
        >>> calls.clear()
        >>> _ = time_round_robin([lambda: calls.append("a"), lambda: calls.append("b")],
        ...                      torch.device("cpu"), reps=2, warmup=0, settle=1)
        >>> "".join(calls)
        'aabbaabb'
    """
    for fn in fns:
        time_fn(fn, device, 0, warmup)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(reps):
        if before_round is not None:
            before_round(i)
        for fn, out in zip(fns, times):
            out += time_fn(fn, device, 1, settle)
    return times


# ---- the roofs: what the device can do, measured in the same run as the rows ---------------------------


def copy_roof(device: torch.device, numel: int, reps: int, warmup: int) -> dict:
    """The device-to-device copy bandwidth (GB/s) of ``numel`` fp32 values, as a roof record.

    Returns ``{"roof": "copy_gbps", "value", "bytes", "median_ms", "device"}``; a copy moves
    ``2 * numel * 4`` bytes (read and write).
    """
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_calls(lambda: dst.copy_(src), device, reps, warmup))
    moved = 2 * numel * 4
    return {
        "roof": "copy_gbps",
        "value": moved / ms / 1e6,
        "bytes": moved,
        "median_ms": ms,
        "device": str(device),
    }


def matmul_roof(device: torch.device, m: int, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    """The rate (TFLOP/s) of an ``m x m`` by ``m x m`` matmul in ``dtype``, as a roof record.

    Returns ``{"roof": "bf16_tflops", "value", "flops", "median_ms", "dtype"}`` (the roof keeps its
    name where a CPU measures fp32, which has the fast path there).
    """
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    ms = statistics.median(time_calls(lambda: a @ b, device, reps, warmup))
    flops = 2 * m**3
    return {
        "roof": "bf16_tflops",
        "value": flops / ms / 1e9,
        "flops": flops,
        "median_ms": ms,
        "dtype": str(dtype),
    }


def measure_peaks(device: torch.device | str, reps: int = 20) -> dict[str, float]:
    """The roofs the rows are compared against, measured on ``device`` in this run.

    ``copy_gbps``: a device-to-device copy of 1 GiB (2 GiB moved per copy, larger than any L2).
    ``bf16_tflops``: an 8192^3 bf16 matmul (fp32 on CPU at 2048^3, where bf16 has no fast path).
    """
    device = torch.device(device)
    if device.type == "cuda":
        numel, m, dtype = (1 << 30) // 4, 8192, torch.bfloat16
    else:
        numel, m, dtype = 1 << 26, 2048, torch.float32
    copy = copy_roof(device, numel, reps, warmup=3)
    matmul = matmul_roof(device, m, dtype, max(3, reps // 4), warmup=2)
    return {"copy_gbps": copy["value"], "bf16_tflops": matmul["value"]}
