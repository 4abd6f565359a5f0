"""The configuration of the masked autoencoder and its named presets.

:class:`MAEConfig` fully describes an :class:`~invcoss.models.MAE` and is what a checkpoint's
``config.json`` stores. Presets:

* ``vit_base``: encoder 768 wide, 12 blocks, 12 heads; decoder 512 / 8 / 16 (the paper's ViT-B/16).
* ``vit_small``: 384 / 12 / 6; decoder 256 / 4 / 8.
* ``vit_tiny``: 192 / 12 / 3; decoder 128 / 2 / 4.
* ``vit_nano``: 96 / 4 / 4; decoder 64 / 2 / 4, at 112x112 and 16x96x96 (49 and 36 tokens).

The first three take the paper's sizes (224x224, 16x192x192). All use patch 16 (16x16x16 in 3D),
MLP ratio 4, 3-channel 2D and 1-channel 3D input, and ``norm_pix_loss=True``. ``vit_nano`` trains
on a 2-core CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from invcoss.models.pos_embed import POS_EMBED_ORDERS, axis_widths

__all__ = ["MAEConfig", "list_presets", "preset_config"]


def _sizes(value: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    sizes = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(sizes) != n or any(s < 1 for s in sizes):
        raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}")
    return sizes


@dataclass(frozen=True)
class MAEConfig:
    """Everything that describes an :class:`MAE` (JSON-serialisable; ints for sizes become tuples).

    ``runtime_fields`` (name, input sizes, ``norm_pix_loss``) do not change any weight's shape:
    :func:`~invcoss.models.load_pretrained_into` with ``strict=False`` lets them differ.

    ``pos_embed_order`` is the convention of the fixed sin-cos position tables the weights were
    trained with (:data:`~invcoss.models.pos_embed.POS_EMBED_ORDERS`): ``"invcoss"`` for every
    model trained here (and every checkpoint saved before the field existed, whose ``config.json``
    lacks it), ``"mae"`` for public MAE weights loaded by :meth:`MAE.from_timm`. It belongs to the
    weights, so it is saved and checked like any field, but it is left out of
    :func:`invcoss.feature_stats.config_hash` so that statistics collected before it existed stay
    valid (the statistics' weights hash still tells two models apart).

    Example:
        >>> MAEConfig(img_size_2d=112).num_patches(2), MAEConfig().num_patches(3)
        (49, 144)
    """

    name: str = "custom"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    img_size_2d: int | tuple[int, int] = (224, 224)
    patch_size_2d: int | tuple[int, int] = (16, 16)
    in_chans_2d: int = 3
    img_size_3d: int | tuple[int, int, int] = (16, 192, 192)
    patch_size_3d: int | tuple[int, int, int] = (16, 16, 16)
    in_chans_3d: int = 1
    norm_pix_loss: bool = True
    pos_embed_order: str = "invcoss"

    runtime_fields: ClassVar[tuple[str, ...]] = ("name", "img_size_2d", "img_size_3d", "norm_pix_loss")

    def __post_init__(self) -> None:
        for name, n in (("img_size_2d", 2), ("patch_size_2d", 2), ("img_size_3d", 3), ("patch_size_3d", 3)):
            object.__setattr__(self, name, _sizes(getattr(self, name), n, name))
        for width, heads, what in (
            (self.embed_dim, self.num_heads, "embed_dim/num_heads"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim/decoder_num_heads"),
        ):
            if heads < 1 or width % heads:
                raise ValueError(f"{what} must divide evenly, got {width}/{heads}")
            axis_widths(width, 3)  # raises unless the width suits 2D and 3D sin-cos tables
        if self.pos_embed_order not in POS_EMBED_ORDERS:
            raise ValueError(
                f"pos_embed_order must be one of {POS_EMBED_ORDERS}, got {self.pos_embed_order!r}"
            )
        if self.depth < 1 or self.decoder_depth < 1:
            raise ValueError(f"depth and decoder_depth must be >= 1, got {self.depth}, {self.decoder_depth}")
        for ndim in (2, 3):
            if any(s % p for s, p in zip(self.img_size(ndim), self.patch_size(ndim))):
                raise ValueError(
                    f"img_size_{ndim}d {self.img_size(ndim)} must be divisible by "
                    f"patch_size_{ndim}d {self.patch_size(ndim)}"
                )

    def img_size(self, ndim: int) -> tuple[int, ...]:
        return self.img_size_2d if ndim == 2 else self.img_size_3d

    def patch_size(self, ndim: int) -> tuple[int, ...]:
        return self.patch_size_2d if ndim == 2 else self.patch_size_3d

    def in_chans(self, ndim: int) -> int:
        return self.in_chans_2d if ndim == 2 else self.in_chans_3d

    def grid(self, ndim: int) -> tuple[int, ...]:
        """Tokens per axis, e.g. ``(14, 14)`` or ``(1, 12, 12)``."""
        return tuple(s // p for s, p in zip(self.img_size(ndim), self.patch_size(ndim)))

    def num_patches(self, ndim: int) -> int:
        return math.prod(self.grid(ndim))

    def patch_dim(self, ndim: int) -> int:
        """Pixels (times channels) in one patch: the width of ``pred``."""
        return math.prod(self.patch_size(ndim)) * self.in_chans(ndim)


_PRESETS: Mapping[str, MAEConfig] = MappingProxyType(
    {
        # The paper's ViT-B/16 with the MAE decoder (Appendix C).
        "vit_base": MAEConfig("vit_base", 768, 12, 12, 512, 8, 16),
        "vit_small": MAEConfig("vit_small", 384, 12, 6, 256, 4, 8),
        "vit_tiny": MAEConfig("vit_tiny", 192, 12, 3, 128, 2, 4),
        # Trains on a 2-core CPU in minutes: 49 tokens (2D) and 36 tokens (3D).
        "vit_nano": MAEConfig("vit_nano", 96, 4, 4, 64, 2, 4, img_size_2d=112, img_size_3d=(16, 96, 96)),
    }
)


def list_presets() -> list[str]:
    """Names accepted by :func:`create_model`.

    Example:
        >>> list_presets()
        ['vit_base', 'vit_nano', 'vit_small', 'vit_tiny']
    """
    return sorted(_PRESETS)


def preset_config(preset: str, **overrides: object) -> MAEConfig:
    """The :class:`MAEConfig` of a preset, with any field replaced.

    Raises:
        ValueError: unknown preset.
        TypeError: an override that is not a field of MAEConfig.
    """
    if preset not in _PRESETS:
        raise ValueError(f"unknown MAE preset {preset!r}; choose one of {list_presets()}")
    fields = {f.name for f in dataclasses.fields(MAEConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown MAE option(s) {unknown}; MAEConfig fields are {sorted(fields)}")
    return dataclasses.replace(_PRESETS[preset], **overrides)
