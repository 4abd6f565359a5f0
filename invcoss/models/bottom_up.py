"""The plain bottom-to-top generator that Table 3 compares InvUNet against.

The generator of generator-based model inversion: latent → linear → reshape (→ norm → activation,
the :class:`~invcoss.models.blocks.NoiseProjector`), then one upsample → conv → norm → activation
stage per level, then a conv and the output activation. Unlike InvUNet there is a single stream and
no skip connection.

Two named configurations reproduce the sizes of Table 3. Their parameter counts are for the 2D
setting of that table (X-ray, 224x224, 3 channels, 128-dim latent):

=====================  ==============================  ==========  ==========
name                   channels                        measured    paper
=====================  ==============================  ==========  ==========
``bottom_up``          384, 192, 96, 48, 24            10.59M      10.6M
``bottom_up_large``    864, 432, 216, 108, 54          26.31M      25.9M
=====================  ==============================  ==========  ==========

With ``ndim=3`` the same names build the 3D generator with the 3D defaults (512-dim latent,
16x192x192, 1 channel, InstanceNorm, trilinear, Tanh); the paper gives no 3D count to compare.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

from invcoss.models.blocks import GeneratorConfig, LatentGenerator, conv_layer, norm_layer, upsample_layer

__all__ = ["BOTTOM_UP_PRESETS", "BottomUpGenerator", "create_bottom_up"]

BOTTOM_UP_PRESETS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "bottom_up": (384, 192, 96, 48, 24),
        "bottom_up_large": (864, 432, 216, 108, 54),
    }
)


class BottomUpGenerator(LatentGenerator):
    """Single-stream generator: ``z (B, latent_dim)`` → ``(B, out_channels, *out_size)``.

    Arguments as :class:`~invcoss.models.InvUNet` (see
    :class:`~invcoss.models.blocks.GeneratorConfig`); ``channels`` defaults to the ``bottom_up``
    configuration.

    Example:
        >>> g = BottomUpGenerator(ndim=2, latent_dim=16, out_size=32, channels=(16, 8, 4))
        >>> g(torch.randn(2, 16)).shape
        torch.Size([2, 3, 32, 32])
    """

    default_channels = BOTTOM_UP_PRESETS["bottom_up"]

    def build_body(self, config: GeneratorConfig) -> None:
        self.stages = nn.Sequential(
            *(
                nn.Sequential(
                    upsample_layer(config.ndim),
                    conv_layer(config.ndim, c_in, c_out),
                    norm_layer(config.ndim, c_out),
                    nn.LeakyReLU(0.2),
                )
                for c_in, c_out in zip(config.channels, config.channels[1:])
            )
        )

    def body(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.stages(bottleneck)  # (B, channels[-1], *out_size)


def create_bottom_up(name: str, ndim: int = 2, **overrides: object) -> BottomUpGenerator:
    """Build a named Table 3 configuration (see the module docstring for its parameter count).

    Args:
        name: ``"bottom_up"`` (10.6M in 2D) or ``"bottom_up_large"`` (25.9M in 2D).
        ndim: 2 or 3.
        overrides: any other :class:`~invcoss.models.blocks.GeneratorConfig` field, e.g. ``out_size``.

    Example:
        >>> g = create_bottom_up("bottom_up", out_size=32)
        >>> g.config.channels
        (384, 192, 96, 48, 24)
    """
    if name not in BOTTOM_UP_PRESETS:
        raise ValueError(
            f"unknown bottom-up configuration {name!r}; choose one of {sorted(BOTTOM_UP_PRESETS)}"
        )
    return BottomUpGenerator(ndim=ndim, channels=BOTTOM_UP_PRESETS[name], **overrides)
