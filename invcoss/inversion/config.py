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
(channels 32-16-8-8-4 in 3D, 64-32-16-8-8 in 2D), small latents, small batches (8), tens of steps
in 2D and 300 (150 for a carried generator) in 3D, and in 3D a generator that works at half the
in-plane size (``upsample=2``). It is what
``invcoss-cli invert`` uses by default, with the packaged ``vit_nano`` models.

Batches are planned by :func:`~invcoss.inversion.engine.plan_batches`: at most ``batch_size``
samples and never fewer than ``min_batch_size`` (4), so a run of 5 CT samples at the quick profile
is one batch of 5 rather than 2 + 2 + 1.

Quick 3D budget (measured on the packaged CT model, ``--threads 1``, one batch of 5 samples,
against 48 preprocessed windows of 4 CT phantoms; "distance" is the quality report's median
distance of the batch mean from the target mean in target std, real batches of 8: 0.36):

=====================  =========  ========  =======  ==========================
fresh-generator steps  distance   air (%)   Fréchet  seconds (1 thread, shared)
=====================  =========  ========  =======  ==========================
100                    1.45       3         0.66     72
200                    0.70       32        0.25     216
300 (default)          0.46       44        0.17     337
real data              0.36       58        —        —
=====================  =========  ========  =======  ==========================

A carried generator needs fewer steps: in a run of 10 samples (``invcoss-cli invert
--num-samples 10 --threads 1``, batches 5 + 5) the second batch ends at 0.45 after 150 steps (the
first at 0.47 after 300; real batches of 8 range 0.19-0.50), Fréchet distance 0.21 (noise 45),
46% air, 388 s in all. The former quick 3D defaults (batches of 2 with a 1-sample tail, 50 and 30 steps) ended at
distances 2.6, 2.1 and 1.6, 1.4% air and a Fréchet distance of 1.6 on the same model.

TV weight. Eq. 8 is a sum over voxels (``tv_reduction="sum"``); the mean made ``alpha_img * L_img``
about 0.012 against an L_norm of 350-4900 at the quick CT profile. On the sum the weight is tied to
the batch and image size, so the quick profile's ``alpha_img = 3e-3`` was chosen by a sweep at its
own sizes (300 steps, 5 CT samples; 40 steps, 8 X-ray samples against 32 X-ray phantoms):

==================  ======================  ==========  ==============  ==========
alpha_img (sum)     TV share, start / end   distance    mean |grad|     Fréchet
==================  ======================  ==========  ==============  ==========
CT: 0.1 on mean     0% / 0%                 0.46        27.8 HU         0.20
CT: 1e-3            3% / 16%                0.45        26.3 HU         0.18
CT: 3e-3 (default)  7% / 31%                0.46        23.8 HU         0.17
CT: 1e-2            21% / 49%               0.58        19.0 HU         0.21
X-ray: 0.1 on mean  0% / 0%                 0.37        0.0177          0.16
X-ray: 3e-3         2% / 6%                 0.37        0.0163          0.12
X-ray: 1e-2         7% / 14%                0.41        0.0136          0.13
X-ray: 0.1          40% / 17%               1.03        0.0031          3.3
==================  ======================  ==========  ==============  ==========

(real: CT 31.9 HU, X-ray 0.0236.) 3e-3 is the largest weight that smooths the samples without
slowing the statistics: at 1e-2 the distance stays 25% (CT) and 9% (X-ray) higher, and the
paper's 0.1 on the sum flattens 2D samples (distance 1.03). The paper profile keeps Appendix C's
0.1 on the sum, as the paper writes it; at the paper's sizes it is unmeasured here.

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
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
ADAM_IMPLS = ("auto", "fused", "foreach", "for-loop")
ALPHA_IMG_QUICK = 3e-3  # on Eq. 8's sum; measured in 2D and 3D, see InversionConfig


_PAPER = {
    2: dict(batch_size=320, steps=1000, warmup_steps=1000, generator_every=1, latent_dim=128),
    3: dict(batch_size=48, steps=500, warmup_steps=2000, generator_every=10, latent_dim=512),
}
# The quick profile's step budgets and TV weights are measured, not guessed: see the class docstring.
_QUICK = {
    2: dict(
        batch_size=8, steps=30, warmup_steps=40, generator_every=1, latent_dim=32,
        generator_channels=(64, 32, 16, 8, 8), alpha_img=ALPHA_IMG_QUICK,
    ),
    3: dict(
        batch_size=8, steps=150, warmup_steps=300, generator_every=10, latent_dim=64,
        generator_channels=(32, 16, 8, 8, 4), upsample=2, alpha_img=ALPHA_IMG_QUICK,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class InversionConfig:
    """Everything that decides what an inversion makes (Eq. 6 and Appendix C).

    Attributes:
        modality: ``ct``, ``mri``, ``xray`` or ``pathology`` (``path`` accepted).
        profile: the profile the values came from (informative).
        batch_size: samples optimised together (the statistics are batch statistics); the
            largest batch the planner makes unless it must grow one to keep ``min_batch_size``
            (:func:`invcoss.inversion.engine.plan_batches`).
        min_batch_size: no batch is planned smaller than this (4 by default), so every batch's
            statistics can match the target: L_norm matches the biased batch variance, which is
            constant at B = 1, and at B = 2 reachable only by a pair mirrored about the target mean
            (both samples are fixed by the two moments). Matching mean and variance fixes two values
            per feature; from B = 4 on, the samples keep at least as many free values per feature
            (B - 2) as the moments fix. A run of fewer samples is one batch, with a warning.
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
        alpha_norm, alpha_img, alpha_rep: loss weights (L_task has weight 1). The paper profile
            keeps Appendix C's alpha_img = 0.1; the quick profile's is calibrated for Eq. 8's sum
            at its sizes (see "TV weight" above).
        mask_ratio: fraction of patches masked for L_task (0.75).
        tv_reduction: ``"sum"`` (the default) is Eq. 8 as written, summed over the batch;
            ``"mean"`` divides it by the number of values, which makes the prior about 10^5 times
            weaker at 3D sizes (at the quick CT profile, alpha_img 0.1 on the mean is 0.012 against
            an L_norm of 350-4900: the prior does nothing measurable). The sum grows with the batch
            and the image size, so ``alpha_img`` is tied to them.
        seed: seeds every random choice; the same seed gives the same samples (on CPU).
        spacing: voxel spacing in mm written into 3D outputs; None: the modality's nominal one.
        upsample: the generator makes images this many times smaller along H and W, and linear
            interpolation brings them to the model's size; 1 (the paper) generates at full size.
            The full-size convolutions of a 3D generator dominate the cost on a CPU, so the quick
            3D profile uses 2 (4x fewer voxels through the generator, smoother images).
        compile_mode: ``"off"``, or the :func:`torch.compile` mode of the step (generator, both
            MAE passes and the losses but L_rep): ``"default"``, ``"reduce-overhead"`` (CUDA
            graphs), ``"max-autotune-no-cudagraphs"``, ``"max-autotune"``. ``"auto"``: ``default``
            on CUDA, ``off`` on the CPU (slower there, see :mod:`invcoss.inversion.step`).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the generator and the frozen ViT; the
            statistics and every loss stay fp32). ``"auto"``: bf16 on CUDA, fp32 on the CPU.
        memory_format: ``"channels_last"`` or ``"contiguous"``, the generator's layout.
            ``"auto"``: channels-last.
        adam: the Adam implementation, ``"fused"``, ``"foreach"`` or ``"for-loop"``. ``"auto"``:
            fused.
        sync_every: the losses are read back to the host (and checked, recorded, shown) every
            this many steps, not after each; a non-finite loss is still found, at most this many
            steps late, and the batch is abandoned as before.
        share_tokens: the masked (L_task) and unmasked (statistics) MAE passes share one patch
            embedding and position table; False runs them separately (the same values).

        The step choices change no setting of the method; their tolerance against the fp32 eager
        step is :data:`invcoss.inversion.step.STEP_TOLERANCE`.
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
    tv_reduction: str = "sum"
    seed: int = 0
    spacing: tuple[float, float, float] | None = None
    upsample: int = 1
    compile_mode: str = "auto"
    precision: str = "auto"
    memory_format: str = "auto"
    adam: str = "auto"
    sync_every: int = 10
    share_tokens: bool = True

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
            "sync_every",
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
        for name, choices in (
            ("compile_mode", COMPILE_MODES),
            ("precision", PRECISIONS),
            ("memory_format", MEMORY_FORMATS),
            ("adam", ADAM_IMPLS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

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
