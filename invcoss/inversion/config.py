"""What an inversion run is: :class:`InversionConfig` (paper and quick profiles) and the input spaces.

The ``paper`` profile is Appendix C of the paper:

====================  =================================  =====================================
                      2D (X-ray, pathology)              3D (CT, MRI)
====================  =================================  =====================================
batch                 320                                48
steps per batch       1000                               500 (2000 for a fresh generator)
new generator         every batch                        every 10 batches
latent z              128-dim, new every batch           512-dim, new every batch
optimiser             Adam, lr 2e-4 (generator), 0.05 (z)
loss weights          alpha_norm 1, alpha_img 0.1, alpha_rep 0.1 (L_task weight 1)
====================  =================================  =====================================

The paper names an "extended initial generation phase of 2,000 steps" for the first batch. A
generator re-initialised after 10 batches is in the same state as the first one, so
``warmup_steps`` applies to the first batch of every fresh generator (with the paper's schedule
and up to 10 batches, that is only the first).

The ``quick`` profile keeps the method and shrinks the work for a laptop CPU: a narrow InvUNet
(channels 32-16-8-8-4 in 3D, 64-32-16-8-8 in 2D), small latents, small batches, tens of steps, and
in 3D a generator that works at half the in-plane size (``upsample=2``). It is what
``invcoss-cli invert`` uses by default, with the packaged ``vit_nano`` models.

Input spaces (the generator's output activation and the map into the model's input space) are
the modalities' own: :mod:`invcoss.modality`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from invcoss.configs import config_from_dict
from invcoss.modality import INPUT_SPACES, InputSpace, canonical_modality

__all__ = [
    "GENERATORS",
    "LOSS_TERMS",
    "PROFILES",
    "InversionConfig",
]

LOSS_TERMS = ("task", "norm", "img", "rep")
GENERATORS = ("invunet", "bottomup", "pixels")
PROFILES = ("paper", "quick")


_PAPER = {
    2: dict(batch_size=320, steps=1000, warmup_steps=1000, generator_every=1, latent_dim=128),
    3: dict(batch_size=48, steps=500, warmup_steps=2000, generator_every=10, latent_dim=512),
}
_QUICK = {
    2: dict(
        batch_size=8, steps=30, warmup_steps=40, generator_every=1, latent_dim=32,
        generator_channels=(64, 32, 16, 8, 8),
    ),
    3: dict(
        batch_size=2, steps=30, warmup_steps=50, generator_every=10, latent_dim=64,
        generator_channels=(32, 16, 8, 8, 4), upsample=2,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class InversionConfig:
    """Everything that decides what an inversion makes (Eq. 6 and Appendix C).

    Attributes:
        modality: ``ct``, ``mri``, ``xray`` or ``pathology`` (``path`` accepted).
        profile: the profile the values came from (informative).
        batch_size: samples optimised together (the statistics are batch statistics).
        steps: optimisation steps per batch.
        warmup_steps: steps for the first batch of each fresh generator.
        generator_every: batches per generator (1: a new generator every batch).
        latent_dim: size of z.
        generator: ``"invunet"`` (the paper's), ``"bottomup"`` (Table 3's baseline) or ``"pixels"``
            (no generator: the images themselves are optimised, Table 2's "w/o G").
        generator_channels: widths of the generator (bottleneck first); None: the paper's for that
            generator (InvUNet 256-128-64-32-16, bottom-up 384-192-96-48-24).
        lr_generator, lr_latent: Adam learning rates of the generator and of z (2e-4, 0.05).
        lr_pixels: Adam learning rate of the pixels with ``generator="pixels"`` (not in the paper).
        losses: the enabled terms of Eq. 6, any of ``task``, ``norm``, ``img``, ``rep`` (Table 2).
        alpha_norm, alpha_img, alpha_rep: loss weights (L_task has weight 1).
        mask_ratio: fraction of patches masked for L_task (0.75).
        tv_reduction: ``"mean"`` divides Eq. 8's sum by the number of voxels, so ``alpha_img``
            keeps its meaning at any size (the sum of a 16x192x192 volume is ~10^5 times larger).
        seed: seeds every random choice; the same seed gives the same samples (on CPU).
        spacing: voxel spacing in mm written into 3D outputs; None: the modality's nominal one.
        upsample: the generator makes images this many times smaller along H and W, and linear
            interpolation brings them to the model's size; 1 (the paper) generates at full size.
            The full-size convolutions of a 3D generator dominate the cost on a CPU, so the quick
            3D profile uses 2 (4x fewer voxels through the generator, smoother images).
    """

    modality: str = "ct"
    profile: str = "custom"
    batch_size: int = 48
    min_batch_size: int = 4
    steps: int = 500
    warmup_steps: int = 2000
    generator_every: int = 10
    latent_dim: int = 512
    generator: str = "invunet"
    generator_channels: tuple[int, ...] | None = None
    lr_generator: float = 2e-4
    lr_latent: float = 0.05
    lr_pixels: float = 0.1
    losses: tuple[str, ...] = LOSS_TERMS
    alpha_norm: float = 1.0
    alpha_img: float = 0.1
    alpha_rep: float = 0.1
    mask_ratio: float = 0.75
    tv_reduction: str = "mean"
    seed: int = 0
    spacing: tuple[float, float, float] | None = None
    upsample: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", canonical_modality(self.modality))
        losses = tuple(dict.fromkeys(self.losses))
        unknown = sorted(set(losses) - set(LOSS_TERMS))
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSS_TERMS}, got {self.losses!r}")
        object.__setattr__(self, "losses", tuple(t for t in LOSS_TERMS if t in losses))
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.generator_channels is not None:
            object.__setattr__(self, "generator_channels", tuple(int(c) for c in self.generator_channels))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"spacing must be 3 positive values in mm, got {self.spacing}")
        for name in (
            "batch_size",
            "min_batch_size",
            "steps",
            "warmup_steps",
            "generator_every",
            "latent_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_generator", "lr_latent", "lr_pixels"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("alpha_norm", "alpha_img", "alpha_rep"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {self.upsample}")
        if self.tv_reduction not in ("mean", "sum"):
            raise ValueError(f"tv_reduction must be 'mean' or 'sum', got {self.tv_reduction!r}")

    @property
    def ndim(self) -> int:
        return INPUT_SPACES[self.modality].ndim

    @property
    def space(self) -> InputSpace:
        return INPUT_SPACES[self.modality]

    @classmethod
    def from_profile(cls, profile: str, modality: str, **overrides: object) -> InversionConfig:
        """The ``paper`` or ``quick`` settings for ``modality``, with any field replaced.

        Raises:
            ValueError: unknown profile, modality or value.
            TypeError: an override that is not a field.

        Example:
            >>> c = InversionConfig.from_profile("paper", "ct")
            >>> c.batch_size, c.steps, c.warmup_steps, c.generator_every, c.latent_dim
            (48, 500, 2000, 10, 512)
            >>> InversionConfig.from_profile("paper", "xray", losses=("task", "norm")).losses
            ('task', 'norm')
        """
        if profile not in PROFILES:
            raise ValueError(f"unknown inversion profile {profile!r}; choose one of {PROFILES}")
        ndim = INPUT_SPACES[canonical_modality(modality)].ndim
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown InversionConfig field(s) {unknown}; fields are {sorted(fields)}")
        values = {**(_PAPER if profile == "paper" else _QUICK)[ndim], **overrides}
        return cls(modality=modality, profile=profile, **values)

    def replace(self, **changes: object) -> InversionConfig:
        return dataclasses.replace(self, **changes)

    def steps_for(self, batch: int) -> int:
        """Optimisation steps of batch ``batch`` (``warmup_steps`` when its generator is fresh)."""
        fresh = self.generator == "pixels" or batch % self.generator_every == 0
        return self.warmup_steps if fresh else self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InversionConfig:
        """The inverse of :meth:`to_dict`, also after a JSON round trip (lists become tuples).

        Example:
            >>> c = InversionConfig.from_profile("quick", "mri")
            >>> import json; InversionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
            True
        """
        return config_from_dict(cls, values)
