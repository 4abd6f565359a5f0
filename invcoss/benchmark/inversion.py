"""The inversion step as a benchmark family: profiles, step variants, the set-up of one step, timing.

One step is what :meth:`invcoss.inversion.Inverter.step_async` does in a real run: the generator
makes the batch, the frozen MAE scores it (L_task, masked) and yields its block features (L_norm,
one stat-matching loss per block), then TV (L_img) and the repulsive pool (L_rep), backward through
all of it, and Adam; the benchmark reads the losses back after every step. A row is one
:class:`StepVariant`: a backend of the three InvCoSS losses and the step choices of
:mod:`invcoss.inversion.step`:

- ``reference``: the reference ops (``torch``) in the plain fp32 eager step (contiguous tensors,
  for-loop Adam, separate MAE passes): the loop as it was before the step choices existed;
- ``fused``: the same step on a fused backend, so its ratio shows what the fused ops save;
- ``default``: the fused backend with the device's ``auto`` choices (on CPU eager, channels-last,
  fused Adam, one patch embedding; on CUDA compiled, bf16);
- ``compiled``: ``default`` compiled with ``torch.compile`` (on CUDA the same as ``default``, so not
  repeated); its compile time is timed apart (``compile_s``: the first call, which includes one step).

``samples_per_h`` is the batch over the time of the mean steps per batch of the profile's schedule
(fresh generators take ``warmup_steps``): optimisation only, no compile, final evaluation or files.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from invcoss.benchmark.providers import kernel_backends
from invcoss.benchmark.timing import time_fn, time_round_robin
from invcoss.inversion import Inverter
from invcoss.inversion.config import InversionConfig
from invcoss.models import create_model

Step = Callable[[], dict[str, float]]

# The step choices of the plain fp32 eager step (the reference and fused rows).
PLAIN_STEP = (
    ("compile_mode", "off"),
    ("precision", "fp32"),
    ("memory_format", "contiguous"),
    ("adam", "for-loop"),
    ("share_tokens", False),
)


@dataclass(frozen=True)
class StepVariant:
    """One row of the inversion step: a name, the backend of the losses and InversionConfig overrides."""

    name: str
    backend: str
    overrides: tuple[tuple[str, object], ...] = ()


def step_variants(device: torch.device | str, compiled: bool | None = None) -> list[StepVariant]:
    """The rows timed on ``device``: reference, fused, default and (``compiled``) compiled.

    ``compiled=None``: a compiled row where ``default`` is not compiled already (the CPU). Without a
    fused backend the rows use ``torch``.
    """
    device = torch.device(device)
    kernels = kernel_backends(device)
    fused = kernels[-1] if device.type == "cuda" and kernels else (kernels[0] if kernels else "torch")
    rows = [
        StepVariant("reference", "torch", PLAIN_STEP),
        StepVariant("fused", fused, PLAIN_STEP),
        StepVariant("default", fused),
    ]
    if compiled if compiled is not None else device.type != "cuda":
        rows.append(StepVariant("compiled", fused, (("compile_mode", "default"),)))
    return rows


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
    # One the Triton interpreter steps through in seconds: the tests and the GPU check's rehearsal.
    "tiny": InversionProfile(
        "tiny",
        "xray",
        "vit_nano",
        2,
        (32, 32),
        "quick",
        (("generator_channels", (8, 8, 4)), ("latent_dim", 8)),
    ),
}


def inversion_profiles_for(device: torch.device | str) -> list[str]:
    """The inversion profiles timed by default: the paper's on CUDA, the reduced ones elsewhere."""
    if torch.device(device).type == "cuda":
        return ["3d-paper", "2d-paper"]
    return ["3d-reduced", "2d-reduced"]


def inversion_setup(
    profile: InversionProfile,
    device: torch.device | str,
    backend: str,
    seed: int = 0,
    overrides: Sequence[tuple[str, object]] = PLAIN_STEP,
):
    """An :class:`~invcoss.inversion.Inverter` of ``profile`` and its first batch, ready to step.

    The model has random weights and the statistics are random (the cost of a step does not depend
    on their values). ``overrides`` are InversionConfig fields (by default the plain fp32 eager
    step, :data:`PLAIN_STEP`). Returns ``(inverter, step)`` where ``step()`` runs one optimisation
    step (:meth:`~invcoss.inversion.InversionEngine.step_async`) and returns its loss values
    (reading them synchronises the device).
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
        profile.profile,
        profile.modality,
        batch_size=profile.batch_size,
        seed=seed,
        **(dict(profile.overrides) | dict(overrides)),
    )
    inv = Inverter(model, stats, config, device=device, backend=backend)
    # A run in its middle: the pool holds more features than their dimension, so RepulsivePool takes
    # its Gram path, as it does for most of a paper-size run (its capacity is the samples requested).
    filled = 2 * max(profile.batch_size, cfg.embed_dim)
    inv.start(2 * filled)
    inv.pool.push(0.1 * torch.randn(filled, cfg.embed_dim, generator=g).to(inv.device))
    params, opts, _, rng = inv.begin_batch(0, profile.batch_size)
    mask = inv.random_mask(profile.batch_size, rng)
    names = inv.value_names

    def step() -> dict[str, float]:
        return dict(zip(names, inv.step_async(params, opts, mask).tolist()))

    return inv, step


def mean_steps_per_batch(config: InversionConfig) -> float:
    """Steps per batch over one generator's batches (the first takes ``warmup_steps``)."""
    every = 1 if config.generator == "pixels" else config.generator_every
    return (config.warmup_steps + (every - 1) * config.steps) / every


def step_flops(step: Step) -> float:
    """Model FLOPs of one call of ``step`` (forward and backward matmuls, convolutions, attention),
    counted by :class:`torch.utils.flop_counter.FlopCounterMode` on an eager step (a compiled graph
    hides its operations from the counter). The call is a real step: it updates the state."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class InversionFamily:
    """The inversion step as a benchmark family (``bench_inversion.py``, ``--family inversion``).

    A case is an :class:`InversionProfile`. The inputs of a backend are an Inverter and its first
    batch, built afresh for each backend from the same seed (:func:`inversion_setup`: the same
    model, statistics, latents and mask). The reference is that step on ``reference_backend``, the
    fused callable the same step on a kernel backend. There is no minimum-work count: the rows
    report steps per second.
    """

    name: str
    profiles: Mapping[str, InversionProfile]
    reference_backend: str = "torch"

    def profiles_for(self, device: torch.device | str) -> list[str]:
        return inversion_profiles_for(device)

    def backends(self, device: torch.device | str) -> list[str]:
        """The reference backend first, then every kernel backend that runs on ``device``."""
        return [self.reference_backend, *kernel_backends(device)]

    def variants(self, device: torch.device | str, compiled: bool | None = None) -> list[StepVariant]:
        """The step variants timed on ``device`` (:func:`step_variants`)."""
        return step_variants(device, compiled)

    def reference(self, profile: InversionProfile, device: torch.device | str, seed: int = 0) -> Step:
        return inversion_setup(profile, device, self.reference_backend, seed)[1]

    def fused(
        self, profile: InversionProfile, device: torch.device | str, backend: str, seed: int = 0
    ) -> Step:
        return inversion_setup(profile, device, backend, seed)[1]


INVERSION = InversionFamily("inversion", INVERSION_PROFILES)


def time_inversion(
    profile: InversionProfile,
    device: torch.device | str,
    backends: Sequence[str | StepVariant],
    steps: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
    flops: bool = False,
    bf16_tflops: float | None = None,
) -> list[dict]:
    """Steps per second of the inversion step of ``profile`` for each backend or variant, in one run.

    ``backends``: backend names (each the plain fp32 eager step on that backend) or
    :class:`StepVariant` rows (:func:`step_variants`). Each gets its own inverter with the same seed
    (so the same model, statistics, latents and mask); the first ``warmup`` steps (kernel
    compilation, autotuning, allocator growth) are not timed, and the very first call of each is
    timed apart as ``compile_s`` (the compile time of a compiled step, with one step's work), then
    they take one step each in turn, ``steps`` times. ``ratio`` is the step time of the first row
    (the reference) over this row's; ``losses`` are the values of the row's first step, the same
    for every row up to its precision's tolerance. ``flops``: also count the model FLOPs of a step
    (``flops``, ``tflops``) and, with ``bf16_tflops`` (the measured matmul rate), the model FLOP
    utilisation ``mfu`` (a fraction of it). ``compile_fallback`` is the engine's reason for running a
    compiled variant eagerly (its compiled step disagreed with the eager one), else None.
    """
    variants = [b if isinstance(b, StepVariant) else StepVariant(b, b, PLAIN_STEP) for b in backends]
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise ValueError(f"backends must be distinct and at least one, got {names}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs, first, compile_s, settings, fallback = [], {}, {}, {}, {}
    for variant in variants:
        if progress:
            progress(f"{profile.name} {variant.name}: set-up and {max(1, warmup)} untimed step(s)")
        inv, step = inversion_setup(profile, device, variant.backend, overrides=variant.overrides)
        settings[variant.name] = inv.step_settings.to_dict()

        def run(step: Step = step, name: str = variant.name) -> dict[str, float]:
            values = step()
            first.setdefault(name, values)
            return values

        t0 = time.perf_counter()
        run()
        sync()
        compile_s[variant.name] = time.perf_counter() - t0
        # Set when the step's own check found the compiled step wrong (it then runs eagerly).
        fallback[variant.name] = inv.compile_fallback
        time_fn(run, device, 0, max(0, warmup - 1))
        runs.append(run)
        mean_steps = mean_steps_per_batch(inv.config)  # the same config for every row but the step

    def announce(i: int) -> None:
        if progress:
            progress(f"{profile.name}: timed round {i + 1}/{steps}")

    # Round-robin, one step of each backend in turn, so a machine getting busier slows all alike.
    times = time_round_robin(runs, device, steps, warmup=0, before_round=announce)
    # Counted after the timing, on the first row's step (eager in every variant list we time).
    step_flops_ = step_flops(runs[0]) if flops else None
    rows = []
    for variant, ts in zip(variants, times):
        med = statistics.median(ts)
        row = {
            "profile": profile.name,
            "model": profile.preset,
            "batch": profile.batch_size,
            "input": "x".join(map(str, profile.img_size)),
            "backend": variant.backend if variant.name == variant.backend else variant.name,
            "variant": variant.name,
            "ops": variant.backend,
            "step": settings[variant.name],
            "device": str(device),
            "median_ms": med,
            "steps_per_s": 1e3 / med,
            "samples_per_h": profile.batch_size * 3.6e6 / (med * mean_steps),
            "compile_s": compile_s[variant.name],
            "compile_fallback": fallback[variant.name],
            "times_ms": ts,
            "losses": first[variant.name],
        }
        if step_flops_ is not None:
            row["flops"] = step_flops_
            row["tflops"] = step_flops_ / med / 1e9
            if bf16_tflops:
                row["mfu"] = row["tflops"] / bf16_tflops
        rows.append(row)
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for r in rows:
        r["ratio"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


# The default step against the eager reference loop (issue 23): x reference and the model FLOP
# utilisation against the measured bf16 matmul rate (GPU only).
INVERSION_TARGETS = {"cpu": {"ratio": 1.5}, "cuda": {"ratio": 2.0, "mfu": 0.35}}


def inversion_verdicts(rows: Sequence[dict]) -> list[str]:
    """One line per profile: the ``default`` row against :data:`INVERSION_TARGETS`.

    Example:
        >>> inversion_verdicts([{"profile": "p", "variant": "default", "device": "cpu", "ratio": 1.6}])
        ['- p: default step 1.60x the reference loop (target >= 1.5x): met']
    """
    out = []
    for r in rows:
        if r.get("variant") != "default":
            continue
        target = INVERSION_TARGETS["cuda" if str(r["device"]).startswith("cuda") else "cpu"]
        parts = [f"{r['ratio']:.2f}x the reference loop (target >= {target['ratio']}x)"]
        met = r["ratio"] >= target["ratio"]
        if "mfu" in target:
            mfu = r.get("mfu")
            parts.append(
                f"{'unmeasured' if mfu is None else format(100 * mfu, '.0f') + '%'} model FLOP "
                f"utilisation (target >= {100 * target['mfu']:.0f}%)"
            )
            met = met and mfu is not None and mfu >= target["mfu"]
        if r.get("compile_fallback"):
            parts.append(f"run eagerly: the compiled step differed ({r['compile_fallback']})")
        out.append(f"- {r['profile']}: default step {', '.join(parts)}: {'met' if met else 'missed'}")
    return out
