"""Side-by-side throughput of the ops: eager reference, torch.compile of it, and every backend.

One *case* is an op family at one shape; one *row* is a case timed for one provider in one mode
(``fwd`` or ``fwd+bwd``). Providers run in the same process on the same inputs, so the ratios
between them are meaningful on a noisy machine even when the absolute times are not.

Used by ``benchmarks/`` (pytest-benchmark), ``invcoss-cli bench`` and the throughput guard.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from invcoss import ops
from invcoss.inversion import Inverter
from invcoss.inversion.config import InversionConfig
from invcoss.models import create_model
from invcoss.ops import backend_torch as ref

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One op family at one shape: how to build inputs, run a provider, and count the work."""

    family: str  # tv, stat_matching, welford, repulsive_direct, repulsive_pool
    shape: tuple[int, ...]
    tag: str = ""  # e.g. "paper" for the paper's shapes
    modes: tuple[str, ...] = MODES

    @property
    def name(self) -> str:
        return f"{self.family}{'-' + self.tag if self.tag else ''}[{'x'.join(map(str, self.shape))}]"


@dataclass
class Row:
    """One measurement; ``ratio_eager`` and ``ratio_compile`` are filled by :func:`add_ratios`."""

    case: str
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
    nbytes: float | None = None  # the minimum traffic of one call (see :func:`work`)
    flops: float | None = None
    ratio_eager: float | None = None
    ratio_compile: float | None = None
    extra: dict = field(default_factory=dict)


def cpu_cases(full: bool = True) -> list[Case]:
    """The CPU sweep: the extension issue's shapes plus the paper's, sized for a 2-core machine."""
    cases = [
        Case("tv", (4, 1, 16, 192, 192)),
        Case("tv", (32, 3, 224, 224)),
        Case("stat_matching", (48, 145, 768)),
        Case("welford", (256, 197, 768), modes=("fwd",)),
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
        Case("welford", (320, 197, 768), modes=("fwd",)),
        Case("repulsive_direct", (320, 1024, 768)),
        Case("repulsive_direct", (320, 16384, 768)),
        Case("repulsive_direct", (320, 100_000, 768)),
        Case("repulsive_pool", (320, 16384, 768)),
        Case("repulsive_pool", (320, 100_000, 768)),
    ]


def providers_for(device: torch.device) -> list[str]:
    """eager and compile of the reference, then every kernel backend that runs on ``device``."""
    return ["eager", "compile"] + kernel_backends(device)


def kernel_backends(device: torch.device | str) -> list[str]:
    """The fused backends available here that run on ``device`` (cpu; or triton and cuda)."""
    kernels = ("cpu",) if torch.device(device).type == "cpu" else ("triton", "cuda")
    return [b for b in kernels if b in ops.available_backends()]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs of ``case`` (the pool, when there is one, is built here, outside the timing)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if case.family == "tv":
        return {"x": rand(*case.shape).clamp_(-1, 1)}
    if case.family in ("stat_matching", "welford"):
        b, *feat = case.shape
        # The target statistics stay fp32, as stored statistics are; only the features change dtype.
        return {"x": rand(b, *feat), "mean": rand(*feat).float() * 0.1, "var": rand(*feat).float().abs()}
    b, p, d = case.shape
    return {"h": rand(b, d), "pool": rand(p, d)}


def build(case: Case, provider: str, mode: str, inputs: dict) -> Callable[[], object]:
    """A zero-argument callable that runs ``case`` once for ``provider`` in ``mode``."""
    backward = mode == "fwd+bwd"
    if case.family == "welford":
        x = inputs["x"].reshape(inputs["x"].shape[0], -1)
        if provider in ("eager", "compile"):
            state = ops.RunningStats(x.shape[1:], device=x.device, dtype=torch.float32, backend="torch")
            state.update(x)  # a non-empty state, so every call merges

            def fold(t: Tensor, count: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
                # The plain-torch way: var_mean of the batch, then Chan's merge into the state.
                var_b, mean_b = torch.var_mean(t.float(), dim=0, correction=0)
                n_b, n = t.shape[0], count + t.shape[0]
                delta = mean_b - mean
                return mean + delta * (n_b / n), m2 + var_b * n_b + delta.square() * (count * n_b / n)

            fn = torch.compile(fold, dynamic=False) if provider == "compile" else fold
            return lambda: fn(x, state.count, state._mean, state._m2)
        state = ops.RunningStats(x.shape[1:], device=x.device, dtype=torch.float32, backend=provider)
        state.update(x)
        return lambda: state.update(x)

    if case.family == "repulsive_pool" and provider not in ("eager", "compile"):
        pool = ops.RepulsivePool(case.shape[1], case.shape[2], device=inputs["h"].device, backend=provider)
        pool.push(inputs["pool"])
        return _with_grad(lambda h: pool.loss(h), inputs["h"], backward)

    f, arg = _loss_fn(case, provider, inputs)
    if provider == "compile":
        f = torch.compile(f, dynamic=False)
    return _with_grad(f, arg, backward)


def _loss_fn(case: Case, provider: str, inputs: dict) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The loss of ``case`` as a function of its differentiable input, and that input."""
    reference = provider in ("eager", "compile")
    if case.family == "tv":
        x = inputs["x"]
        weights = (1.0,) * (x.ndim - 2)

        def tv(t: Tensor) -> Tensor:
            if reference:
                return ref.tv(t, weights).sum()
            return ops.total_variation(t, reduction="sum", backend=provider)

        return tv, x
    if case.family == "stat_matching":
        x = inputs["x"]
        mean, var = inputs["mean"], inputs["var"]

        def stat_matching(t: Tensor) -> Tensor:
            if reference:
                return ref.stat_matching(t.reshape(t.shape[0], -1), mean.reshape(-1), var.reshape(-1))
            return ops.stat_matching_loss(t, mean, var, backend=provider)

        return stat_matching, x
    pool = inputs["pool"]  # repulsive_direct, and the reference of repulsive_pool: the direct formula

    def repulsive(h: Tensor) -> Tensor:
        if reference:
            return ref.repulsive_direct(h, pool, 1e-8)
        return ops.repulsive_cosine_loss(h, pool, backend=provider)

    return repulsive, inputs["h"]


def _with_grad(f: Callable[[Tensor], Tensor], arg: Tensor, backward: bool) -> Callable[[], object]:
    if not backward:

        def run_fwd() -> Tensor:
            with torch.no_grad():
                return f(arg)

        return run_fwd
    leaf = arg.detach().requires_grad_()

    def run_fwd_bwd() -> Tensor:
        leaf.grad = None
        loss = f(leaf)
        loss.backward()
        return leaf.grad

    return run_fwd_bwd


def work(case: Case, mode: str, itemsize: int) -> tuple[float | None, float | None]:
    """(bytes, flops) that any implementation of one call must move or compute, at the least.

    ``itemsize`` is the element size of the inputs (the gradient has the input's dtype). Forward and
    backward are separate calls under autograd, so ``fwd+bwd`` counts what each must do:

    - tv: forward reads x; backward reads x again and writes the gradient (3 passes in all). A
      design that keeps a gradient from the forward pass moves more, not less.
    - stat_matching: the same three passes (the statistics vectors are negligible).
    - welford: reads the batch once.
    - repulsive_direct: reads h and the pool; the cosine matrix ``h^ p^T`` is ``2 B P D`` flops and
      the gradient ``c p^`` another ``2 B P D``; backward reads both again and writes the gradient.
    - repulsive_pool (the Gram path): ``h^ G h^`` is ``2 B D^2`` flops; the gradient reuses ``G h^``
      (a saved ``(B, D)``), so fwd+bwd needs no more matmul flops; G is read as fp32.
    """
    fam, shape = case.family, case.shape
    numel = 1
    for s in shape:
        numel *= s
    passes = 3 if mode == "fwd+bwd" else 1
    if fam in ("tv", "stat_matching"):
        return float(numel * itemsize * passes), None
    if fam == "welford":
        return float(numel * itemsize), None
    b, p, d = shape
    if fam == "repulsive_pool":
        nbytes = b * d * itemsize * passes + d * d * 4 * (2 if mode == "fwd+bwd" else 1)
        return float(nbytes), 2.0 * b * d * d
    reads = (b + p) * d * itemsize
    if mode == "fwd+bwd":
        return float(2 * reads + b * d * itemsize), 4.0 * b * p * d
    return float(reads), 2.0 * b * p * d


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


def make_row(
    case: Case, provider: str, mode: str, device: torch.device, dtype: torch.dtype, times_ms: list[float]
) -> Row:
    """A :class:`Row` from raw times (median, 20th and 80th percentiles, GB/s or TFLOP/s)."""
    qs = statistics.quantiles(times_ms, n=5) if len(times_ms) > 1 else [times_ms[0]] * 4
    med = statistics.median(times_ms)
    nbytes, flops = work(case, mode, torch.empty((), dtype=dtype).element_size())
    return Row(
        case=case.name,
        family=case.family,
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
    cases = cases if cases is not None else (cpu_cases() if device.type == "cpu" else gpu_cases())
    providers = providers or providers_for(device)
    rows = []
    for case in cases:
        inputs = make_inputs(case, device, dtype)
        for mode in case.modes:
            for provider in providers:
                if progress:
                    progress(f"{case.name} {mode} {provider}")
                fn = build(case, provider, mode, inputs)
                warmup = 2 if provider == "compile" else 1
                rows.append(
                    make_row(case, provider, mode, device, dtype, time_calls(fn, device, reps, warmup))
                )
        del inputs
    return add_ratios(rows)


def measure_peaks(device: torch.device | str, reps: int = 20) -> dict[str, float]:
    """The roofs the rows are compared against, measured on ``device`` in this run.

    ``copy_gbps``: a device-to-device copy of 1 GiB (2 GiB moved per copy, larger than any L2).
    ``bf16_tflops``: an 8192^3 bf16 matmul (fp32 on CPU at 2048^3, where bf16 has no fast path).
    """
    device = torch.device(device)
    n = (1 << 30) // 4 if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_calls(lambda: dst.copy_(src), device, reps, warmup=3))
    if device.type == "cuda":
        m, dtype = 8192, torch.bfloat16
    else:
        m, dtype = 2048, torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    mm_ms = statistics.median(time_calls(lambda: a @ b, device, max(3, reps // 4), warmup=2))
    return {"copy_gbps": 2 * n * 4 / copy_ms / 1e6, "bf16_tflops": 2 * m**3 / mm_ms / 1e9}


def to_markdown(rows: list[Row], title: str = "", peaks: dict[str, float] | None = None) -> str:
    """A Markdown table of rows (one line per case, mode, dtype and provider).

    With ``peaks`` (from :func:`measure_peaks`) it adds each row's minimum traffic as a fraction of
    the measured copy bandwidth, and its minimum flops as a fraction of the measured bf16 matmul rate.
    """
    lines = [f"### {title}", ""] if title else []
    if peaks:
        lines += [
            f"Measured roofs: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul "
            f"{peaks['bf16_tflops']:.1f} TFLOP/s.",
            "",
        ]
    head = "| case | mode | dtype | provider | median ms | GB/s | TFLOP/s | x eager | x compile |"
    rule = "|---|---|---|---|---:|---:|---:|---:|---:|"
    if peaks:
        head, rule = head + " % copy | % bf16 |", rule + "---:|---:|"
    lines += [head, rule]

    def fmt(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in rows:
        line = (
            f"| {r.case} | {r.mode} | {r.dtype} | {r.provider} | {r.median_ms:.3f} | {fmt(r.gbps, '.1f')} | "
            f"{fmt(r.tflops, '.3f')} | {fmt(r.ratio_eager, '.2f')} | {fmt(r.ratio_compile, '.2f')} |"
        )
        if peaks:
            copy = None if r.gbps is None else 100 * r.gbps / peaks["copy_gbps"]
            mm = None if r.tflops is None else 100 * r.tflops / peaks["bf16_tflops"]
            line += f" {fmt(copy, '.0f')} | {fmt(mm, '.0f')} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# ---- the inversion step -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InversionProfile:
    """One inversion workload: a model preset, a modality, a batch size and the generator."""

    name: str
    modality: str
    preset: str
    batch_size: int
    img_size: tuple[int, ...]
    profile: str = "paper"  # the InversionConfig profile whose generator settings are used
    overrides: tuple[tuple[str, object], ...] = ()


INVERSION_PROFILES: dict[str, InversionProfile] = {
    # The paper's settings (Appendix C): vit_base, 3D batch 48 at 16x192x192, 2D batch 320 at 224.
    "3d-paper": InversionProfile("3d-paper", "ct", "vit_base", 48, (16, 192, 192)),
    "2d-paper": InversionProfile("2d-paper", "xray", "vit_base", 320, (224, 224)),
    # The same loops at a size a 2-core CPU times in seconds (the quick profile's generator).
    "3d-reduced": InversionProfile("3d-reduced", "ct", "vit_nano", 2, (16, 96, 96), "quick"),
    "2d-reduced": InversionProfile("2d-reduced", "xray", "vit_nano", 8, (112, 112), "quick"),
}


def inversion_profiles_for(device: torch.device | str) -> list[str]:
    """The inversion profiles timed by default: the paper's on CUDA, the reduced ones elsewhere."""
    if torch.device(device).type == "cuda":
        return ["3d-paper", "2d-paper"]
    return ["3d-reduced", "2d-reduced"]


def inversion_setup(profile: InversionProfile, device: torch.device | str, backend: str, seed: int = 0):
    """An :class:`~invcoss.inversion.Inverter` of ``profile`` and its first batch, ready to step.

    The model has random weights and the statistics are random (the cost of a step does not depend
    on their values). Returns ``(inverter, step)`` where ``step()`` runs one optimisation step and
    returns its loss values (reading them synchronises the device).
    """

    ndim = len(profile.img_size)
    size_kw = {"img_size_2d": profile.img_size} if ndim == 2 else {"img_size_3d": profile.img_size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(profile.preset, **size_kw)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.num_patches(ndim) + 1, cfg.embed_dim)
    stats = [
        (0.1 * torch.randn(shape, generator=g), 0.5 + torch.rand(shape, generator=g))
        for _ in range(cfg.depth)
    ]
    config = InversionConfig.from_profile(
        profile.profile, profile.modality, batch_size=profile.batch_size, seed=seed, **dict(profile.overrides)
    )
    inv = Inverter(model, stats, config, device=device, backend=backend)
    # A run in its middle: the pool holds more features than their dimension, so RepulsivePool takes
    # its Gram path, as it does for most of a paper-size run (its capacity is the samples requested).
    filled = 2 * max(profile.batch_size, cfg.embed_dim)
    inv.start(2 * filled)
    inv.pool.push(0.1 * torch.randn(filled, cfg.embed_dim, generator=g).to(inv.device))
    params, opts, _, rng = inv.begin_batch(0, profile.batch_size)
    mask = inv.random_mask(profile.batch_size, rng)
    return inv, lambda: inv.step(params, opts, mask)


def time_inversion(
    profile: InversionProfile,
    device: torch.device | str,
    backends: list[str],
    steps: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Steps per second of the inversion step of ``profile`` for each backend, in one run.

    Each backend gets its own inverter with the same seed (so the same model, statistics, latents
    and mask); the first ``warmup`` steps (kernel compilation, autotuning, allocator growth) are not
    timed, then the backends take one step each in turn, ``steps`` times. ``ratio`` is the step
    time of ``backends[0]`` (the reference) over this backend's.
    """
    if not backends or len(set(backends)) != len(backends):
        raise ValueError(f"backends must be distinct and at least one, got {backends}")
    device = torch.device(device)
    runs = []
    for backend in backends:
        if progress:
            progress(f"{profile.name} {backend}: set-up and {warmup} untimed step(s)")
        inv, step = inversion_setup(profile, device, backend)
        time_fn(step, device, 0, warmup)
        runs.append((backend, step))
    # Round-robin, one step of each backend in turn, so a machine getting busier slows all alike.
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(steps):
        if progress:
            progress(f"{profile.name}: timed round {i + 1}/{steps}")
        for backend, step in runs:
            times[backend] += time_fn(step, device, 1, 0)
    rows = []
    for backend in backends:
        med = statistics.median(times[backend])
        rows.append(
            {
                "profile": profile.name,
                "model": profile.preset,
                "batch": profile.batch_size,
                "input": "x".join(map(str, profile.img_size)),
                "backend": backend,
                "device": str(device),
                "median_ms": med,
                "steps_per_s": 1e3 / med,
                "times_ms": times[backend],
            }
        )
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for r in rows:
        r["ratio"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


def inversion_markdown(rows: list[dict], title: str = "") -> str:
    """A Markdown table of :func:`time_inversion` rows."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| profile | model | batch | input | backend | median ms/step | steps/s | x reference |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['model']} | {r['batch']} | {r['input']} | {r['backend']} | "
            f"{r['median_ms']:.1f} | {r['steps_per_s']:.3f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"
