"""What a continual pre-training run is: :class:`ContinualConfig` with ``paper`` and ``quick`` profiles.

Stage 2 of Algorithm 1 (Eq. 4) trains one MAE through a sequence of modalities. Three methods
decide what the buffer of stage ``T`` holds:

==========  ====================================================================================
``seq``     nothing: plain sequential pre-training, the forgetting baseline (SeqSSL of Fig. 6b)
``er``      a random ``buffer_fraction`` of each earlier stage's real samples, kept from the end
            of that stage (experience replay; the privacy-violating reference)
``invcoss`` the same number of synthetic samples per earlier stage, inverted from the model of
            stage ``T-1`` and the feature statistics stored at the end of that stage (Sec. 3.2)
==========  ====================================================================================

Batches are single-modality (MedCoSS): a current batch gets the MAE loss (Eq. 7); a buffer batch
gets ``distill_weight`` x the MSE between the current encoder's token features and those of the
frozen stage ``T-1`` model on the same visible tokens, plus ``buffer_mae_weight`` x its MAE loss
(the paper replays synthetic images for "both standard feature distillation and task-oriented
self-supervision", Sec. 1). Buffer samples are mixed up within their batch (MedCoSS's intra-modal
mixup) when ``mixup_alpha > 0``.

``interleave`` places the buffer batches in an epoch:

- ``"shuffle"`` (default): every buffer sample once per epoch, in batches of ``batch_size``, the
  buffer batches at random positions among the current ones. The buffer's share of the steps is its
  share of the samples, as in MedCoSS where the buffer joins the current data set.
- ``"alternate"``: one buffer batch after every ``buffer_every`` current batches, the earlier
  modalities in turn, each cycling through its buffer. The replay pressure no longer depends on how
  small the buffer is, which suits small data sets.

Profiles:

=====================  ==============================  =========================================
                       ``paper``                       ``quick``
=====================  ==============================  =========================================
model                  ``vit_base`` (224, 16x192x192)   ``vit_nano`` (112, 16x96x96)
epochs per stage       300 (Sec. 4.1)                  16
batch, peak lr         512, 1.5e-4                     8, 1e-3
buffer                 5% (Sec. 4.1), shuffled          10%, alternating after every batch
inversion              ``paper`` profile                ``quick`` profile
buffer MAE target      the buffer's pixels (Eq. 7)      the previous model's reconstruction
=====================  ==============================  =========================================

The quick profile keeps the method and shrinks the work so that a run over three phantom
modalities finishes in minutes on a laptop CPU; its larger lr suits the few steps of a small data
set, and its alternating buffer keeps a 10% buffer of a few dozen samples from being one batch in
six. Its buffer MAE term asks the decoder for what the frozen previous model reconstructs on the
same masked buffer sample instead of the buffer's own pixels when the buffer is synthetic
(``buffer_mae_target="auto"``: ``invcoss``; a real ``er`` buffer keeps its pixels, which are
data): with small inversion budgets the synthetic samples are blurred versions of the modality,
and fitting their pixels teaches the decoder that blur, which the real held-out data then pays
for (docs/experiments.md measures both). Everything else (warm-up over 40/300 of the epochs, mask
ratio 0.75, AdamW with weight decay 0.05, distillation weight 1, MAE term on buffer batches with
weight 1, mixup with alpha 1) is the same in both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from invcoss.configs import config_from_dict
from invcoss.inversion.config import InversionConfig
from invcoss.modality import canonical_modality
from invcoss.training import TrainingSchedule

__all__ = ["BUFFER_MAE_TARGETS", "INTERLEAVES", "METHODS", "PROFILES", "ContinualConfig", "buffer_count"]

METHODS = ("seq", "er", "invcoss")
BUFFER_MAE_TARGETS = ("pixels", "teacher", "auto")
INTERLEAVES = ("shuffle", "alternate")
PROFILES = ("paper", "quick")

_PROFILE_VALUES = {
    "paper": dict(
        preset="vit_base", epochs=300, batch_size=512, lr=1.5e-4,
        buffer_fraction=0.05, interleave="shuffle", inversion_profile="paper",
    ),
    "quick": dict(
        preset="vit_nano", epochs=16, batch_size=8, lr=1e-3,
        buffer_fraction=0.10, interleave="alternate", buffer_every=1, inversion_profile="quick",
        buffer_mae_target="auto",
    ),
}  # fmt: skip


def buffer_count(num_samples: int, fraction: float) -> int:
    """Samples kept (``er``) or synthesised (``invcoss``) for a stage of ``num_samples``: at least one.

    Example:
        >>> buffer_count(1000, 0.05), buffer_count(48, 0.10), buffer_count(5, 0.01)
        (50, 5, 1)
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return max(1, min(num_samples, round(num_samples * fraction)))


@dataclass(frozen=True)
class ContinualConfig(TrainingSchedule):
    """Everything that decides a continual pre-training run (see the module docstring).

    Attributes:
        method: ``seq``, ``er`` or ``invcoss``.
        order: the modalities, one stage each, e.g. ``("ct", "mri", "xray")`` (no repeats).
        profile: the profile the values came from (informative).
        preset: the MAE preset of the first stage (:func:`invcoss.models.create_model`).
        img_size_2d, img_size_3d: model input sizes (None: the preset's).
        epochs: epochs per stage.
        first_stage_epochs: epochs of the first stage (None: ``epochs``). The first stage trains a
            fresh model, so it may need more steps than the later stages to reach its plateau;
            otherwise the next stages' gains on its modality are continued learning and read as
            negative forgetting (docs/experiments.md, "The first stage's budget"). Its warm-up
            and cosine decay span its own epochs.
        batch_size: samples per batch, current and buffer alike (a smaller buffer gives smaller
            buffer batches).
        lr, min_lr, warmup_epochs, weight_decay: AdamW with linear warm-up and cosine decay per
            stage (:func:`invcoss.pretrain.learning_rate`; warm-up None: 40/300 of the epochs).
        mask_ratio: fraction of patches hidden (0.75).
        buffer_fraction: buffer size per earlier stage as a fraction of its samples (the paper
            compares 0.01, 0.05 and 0.10, Fig. 7); see :func:`buffer_count`.
        distill_weight: weight of the feature distillation on buffer batches (1).
        buffer_mae_weight: weight of the MAE loss on buffer batches (0 turns it off).
        buffer_mae_flat_std: masked buffer patches whose raw pixels have a standard deviation
            below this (model units) are left out of the buffer's MAE term (0, the default, keeps
            every patch; see :func:`invcoss.continual.replay.replay_loss`).
        buffer_mae_target: what the buffer's MAE term reconstructs: ``"pixels"`` (the buffer
            sample, Eq. 7), ``"teacher"`` (the frozen previous model's reconstruction of the
            same masked sample; see :func:`invcoss.continual.replay.replay_loss`) or ``"auto"``:
            ``"teacher"`` for a synthetic buffer (``invcoss``), ``"pixels"`` for a real one
            (:meth:`mae_target`).
        mixup_alpha: intra-batch mixup of buffer samples with ``lambda ~ Beta(alpha, alpha)`` per
            sample (0 turns it off).
        interleave: ``"shuffle"`` or ``"alternate"`` (module docstring).
        buffer_every: with ``"alternate"``, current batches between two buffer batches.
        inversion_profile: :class:`invcoss.inversion.config.InversionConfig` profile (``invcoss``).
        inversion_batch_size, inversion_steps, inversion_warmup_steps: override that profile.
        inversion_overrides: ``(field, value)`` pairs replacing any other field of that profile,
            e.g. ``(("losses", ("task", "norm")),)``.
        stats_batch_size: batch size of the statistics pass at the end of each stage.
        seed: seeds the initial weights, shuffling, masking, buffer choice and inversion.
        amp: bf16 autocast on CUDA (ignored on CPU).
        num_workers: DataLoader workers for the current data.
    """

    method: str = "invcoss"
    order: tuple[str, ...] = ("ct", "mri", "xray")
    profile: str = "custom"
    preset: str = "vit_base"
    img_size_2d: tuple[int, int] | None = None
    img_size_3d: tuple[int, int, int] | None = None
    first_stage_epochs: int | None = None
    buffer_fraction: float = 0.05
    distill_weight: float = 1.0
    buffer_mae_weight: float = 1.0
    buffer_mae_flat_std: float = 0.0
    buffer_mae_target: str = "pixels"
    mixup_alpha: float = 1.0
    interleave: str = "shuffle"
    buffer_every: int = 1
    inversion_profile: str = "paper"
    inversion_batch_size: int | None = None
    inversion_steps: int | None = None
    inversion_warmup_steps: int | None = None
    inversion_overrides: tuple[tuple[str, object], ...] = ()
    stats_batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

        order = tuple(canonical_modality(m) for m in self.order)
        if not order:
            raise ValueError("order must name at least one modality")
        if len(set(order)) != len(order):
            raise ValueError(f"order must not repeat a modality, got {','.join(order)}")
        object.__setattr__(self, "order", order)
        for name in ("img_size_2d", "img_size_3d"):
            value = getattr(self, name)
            if value is not None:
                n = 2 if name == "img_size_2d" else 3
                value = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
                if len(value) != n or min(value) < 1:
                    raise ValueError(f"{name} must be {n} positive ints, got {getattr(self, name)!r}")
                object.__setattr__(self, name, value)
        if self.first_stage_epochs is not None and self.first_stage_epochs < 1:
            raise ValueError(f"first_stage_epochs must be >= 1 or None, got {self.first_stage_epochs}")
        for name in ("buffer_every", "stats_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.buffer_fraction <= 1:
            raise ValueError(f"buffer_fraction must be in (0, 1], got {self.buffer_fraction}")
        for name in ("distill_weight", "buffer_mae_weight", "buffer_mae_flat_std", "mixup_alpha"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.method != "seq" and self.distill_weight == 0 and self.buffer_mae_weight == 0:
            raise ValueError(
                f"method {self.method} needs distill_weight > 0 or buffer_mae_weight > 0 "
                "(both are 0: the buffer would not be used)"
            )
        if self.buffer_mae_target not in BUFFER_MAE_TARGETS:
            raise ValueError(
                f"buffer_mae_target must be one of {', '.join(BUFFER_MAE_TARGETS)}, got {self.buffer_mae_target!r}"
            )
        if self.interleave not in INTERLEAVES:
            raise ValueError(f"interleave must be one of {', '.join(INTERLEAVES)}, got {self.interleave!r}")
        if self.inversion_profile not in PROFILES:
            raise ValueError(f"inversion_profile must be one of {PROFILES}, got {self.inversion_profile!r}")

        pairs = tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in self.inversion_overrides)
        object.__setattr__(self, "inversion_overrides", pairs)
        known = {f.name for f in dataclasses.fields(InversionConfig)} - {"modality", "profile", "seed"}
        unknown = sorted({k for k, _ in pairs} - known)
        if unknown:
            raise ValueError(f"inversion_overrides names unknown InversionConfig field(s) {unknown}")
        for name in ("inversion_batch_size", "inversion_steps", "inversion_warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    @classmethod
    def from_profile(cls, profile: str, **overrides: object) -> ContinualConfig:
        """The ``paper`` or ``quick`` settings with any field replaced.

        Raises:
            ValueError: unknown profile or a bad value.
            TypeError: an override that is not a field.

        Example:
            >>> c = ContinualConfig.from_profile("quick", method="er", order=("ct", "xray"))
            >>> c.preset, c.epochs, c.batch_size, c.buffer_fraction, c.interleave
            ('vit_nano', 16, 8, 0.1, 'alternate')
            >>> ContinualConfig.from_profile("paper").buffer_fraction
            0.05
        """
        if profile not in PROFILES:
            raise ValueError(f"unknown continual profile {profile!r}; choose one of {PROFILES}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown ContinualConfig field(s) {unknown}; fields are {sorted(fields)}")
        return cls(profile=profile, **{**_PROFILE_VALUES[profile], **overrides})

    def stage_epochs(self, stage: int) -> int:
        """Epochs of 0-based ``stage``: ``first_stage_epochs`` for the first (when set), else ``epochs``.

        Example:
            >>> c = ContinualConfig.from_profile("quick", first_stage_epochs=40)
            >>> c.stage_epochs(0), c.stage_epochs(1)
            (40, 16)
        """
        if stage == 0 and self.first_stage_epochs is not None:
            return self.first_stage_epochs
        return self.epochs

    def replace(self, **changes: object) -> ContinualConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ContinualConfig:
        """Inverse of :meth:`to_dict` (lists from JSON become tuples)."""
        return config_from_dict(cls, values)

    def inversion_config(self, modality: str, seed: int):
        """The :class:`~invcoss.inversion.config.InversionConfig` that inverts ``modality``."""

        overrides = {
            k: v
            for k, v in (
                ("batch_size", self.inversion_batch_size),
                ("steps", self.inversion_steps),
                ("warmup_steps", self.inversion_warmup_steps),
            )
            if v is not None
        }
        overrides.update(dict(self.inversion_overrides))
        return InversionConfig.from_profile(self.inversion_profile, modality, seed=seed, **overrides)

    def mae_target(self) -> str:
        """The buffer MAE target this run uses: ``buffer_mae_target`` with ``"auto"`` resolved.

        Example:
            >>> c = ContinualConfig.from_profile("quick")
            >>> c.buffer_mae_target, c.replace(method="invcoss").mae_target(), c.replace(method="er").mae_target()
            ('auto', 'teacher', 'pixels')
        """
        if self.buffer_mae_target != "auto":
            return self.buffer_mae_target
        return "teacher" if self.method == "invcoss" else "pixels"

    def model_overrides(self) -> dict:
        """The ``create_model`` overrides of the input sizes."""
        out: dict = {}
        if self.img_size_2d is not None:
            out["img_size_2d"] = self.img_size_2d
        if self.img_size_3d is not None:
            out["img_size_3d"] = self.img_size_3d
        return out
