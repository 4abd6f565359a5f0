"""The inversion step as a benchmark family: profiles, the set-up of one step, round-robin timing.

One step is what :meth:`invcoss.inversion.Inverter.step` does in a real run: the generator makes the
batch, the frozen MAE scores it (L_task, masked) and yields its block features (L_norm, one
stat-matching loss per block), then TV (L_img) and the repulsive pool (L_rep), backward through all
of it, and Adam. Only the backend of the three InvCoSS losses changes between rows, so the ratio
shows what the fused ops save in the whole loop.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from invcoss.benchmark.providers import kernel_backends
from invcoss.benchmark.timing import time_fn, time_round_robin
from invcoss.inversion import Inverter
from invcoss.inversion.config import InversionConfig
from invcoss.models import create_model

Step = Callable[[], dict[str, float]]


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
    backends: list[str],
    steps: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Steps per second of the inversion step of ``profile`` for each backend, in one run.

    Each backend gets its own inverter with the same seed (so the same model, statistics, latents
    and mask); the first ``warmup`` steps (kernel compilation, autotuning, allocator growth) are not
    timed, then the backends take one step each in turn, ``steps`` times. ``ratio`` is the step
    time of ``backends[0]`` (the reference) over this backend's; ``losses`` are the values of the
    backend's first step, the same for every backend up to rounding.
    """
    if not backends or len(set(backends)) != len(backends):
        raise ValueError(f"backends must be distinct and at least one, got {backends}")
    device = torch.device(device)
    runs, first = [], {}
    for backend in backends:
        if progress:
            progress(f"{profile.name} {backend}: set-up and {warmup} untimed step(s)")
        _, step = inversion_setup(profile, device, backend)

        def run(step: Step = step, backend: str = backend) -> dict[str, float]:
            values = step()
            first.setdefault(backend, values)
            return values

        time_fn(run, device, 0, warmup)
        runs.append(run)

    def announce(i: int) -> None:
        if progress:
            progress(f"{profile.name}: timed round {i + 1}/{steps}")

    # Round-robin, one step of each backend in turn, so a machine getting busier slows all alike.
    times = time_round_robin(runs, device, steps, warmup=0, before_round=announce)
    rows = []
    for backend, ts in zip(backends, times):
        med = statistics.median(ts)
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
                "times_ms": ts,
                "losses": first[backend],
            }
        )
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for r in rows:
        r["ratio"] = rows[0]["median_ms"] / r["median_ms"]
    return rows
