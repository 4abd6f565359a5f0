"""InvUNet: the dual-stream generator of Sec. 3.3, Appendix B.3, Fig. 8 and Table 4.

::

    z (B, latent) ──NoiseProjector──► bottleneck (B, 256, 14, 14) / (B, 256, 1, 12, 12)
                                           │                        │
                          Memory Cache Branch (UpBlocks)   Inversion Branch (UpBlocks)
                          MC-1 128 @ 28x28  ─── skip ──►   Inv-1 128 @ 28x28
                          MC-2  64 @ 56x56  ─── skip ──►   Inv-2  64 @ 56x56
                          MC-3  32 @ 112²   ─── skip ──►   Inv-3  32 @ 112²
                          MC-4  16 @ 224²   ─── skip ──►   Inv-4  16 @ 224² ──conv──► Sigmoid / Tanh

Both branches start from the bottleneck and double every axis at each level (3D: 1x12x12 →
2x24x24 → 4x48x48 → 8x96x96 → 16x192x192). A Memory Cache UpBlock is upsample → ConvBlock(C_in →
C_out). An Inversion UpBlock upsamples its own previous level, concatenates the Memory Cache output
of the same level and runs ConvBlock(C_in + C_out → C_out): the skip is fused by concatenation, as in
U-Net, so the Inversion Branch is the wider of the two (the paper's "primary" pathway, 0.78M against
the Memory Cache Branch's 0.59M in 2D). With the Noise Projector's 6.47M linear layer and a 3x3
final convolution the 2D model has 7.85M parameters, against the paper's 7.7M (Table 3): 2% over.
"""

from __future__ import annotations

import torch
from torch import nn

from invcoss.models.blocks import GeneratorConfig, LatentGenerator, UpBlock

__all__ = ["InvUNet", "InversionBranch", "MemoryCacheBranch"]


class MemoryCacheBranch(nn.Module):
    """The lightweight branch: UpBlocks from the bottleneck, keeping every level's output.

    ``x: (B, channels[0], *S)`` → list of ``(B, channels[i], *S * 2**i)`` for ``i = 1..n``.

    Example:
        >>> mc = MemoryCacheBranch(2, (8, 4, 2))
        >>> [tuple(f.shape) for f in mc(torch.rand(1, 8, 3, 3))]
        [(1, 4, 6, 6), (1, 2, 12, 12)]
    """

    def __init__(self, ndim: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.levels = nn.ModuleList(UpBlock(ndim, c_in, c_out) for c_in, c_out in zip(channels, channels[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        priors = []
        for level in self.levels:
            x = level(x)
            priors.append(x)
        return priors


class InversionBranch(nn.Module):
    """The primary branch: UpBlocks from the bottleneck, each fed the Memory Cache skip of its level.

    ``x: (B, channels[0], *S)`` and ``skips`` as :class:`MemoryCacheBranch` returns them →
    ``(B, channels[-1], *S * 2**n)``.

    Example:
        >>> mc, inv = MemoryCacheBranch(2, (8, 4, 2)), InversionBranch(2, (8, 4, 2))
        >>> b = torch.rand(1, 8, 3, 3)
        >>> inv(b, mc(b)).shape
        torch.Size([1, 2, 12, 12])
    """

    def __init__(self, ndim: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            UpBlock(ndim, c_in, c_out, skip_channels=c_out) for c_in, c_out in zip(channels, channels[1:])
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for level, skip in zip(self.levels, skips, strict=True):
            x = level(x, skip)
        return x


class InvUNet(LatentGenerator):
    """The InvUNet generator: ``z (B, latent_dim)`` → ``(B, out_channels, *out_size)``.

    Args:
        ndim: 2 (images, BatchNorm, bilinear) or 3 (volumes, InstanceNorm, trilinear).
        latent_dim: size of z; default 128 (2D) / 512 (3D).
        out_size: output size, divisible by ``2 ** (len(channels) - 1)`` (16 by default) on every
            axis; the bottleneck is ``out_size / 16``. Default 224x224 / 16x192x192.
        channels: bottleneck width, then the width of each level (Table 4: 256, 128, 64, 32, 16).
        out_channels: default 3 (2D) / 1 (3D).
        out_activation: ``"sigmoid"`` (2D default, [0, 1]), ``"tanh"`` (3D default, [-1, 1]) or
            ``"none"``.

    Raises:
        ValueError: an out_size not divisible by the upsampling factor, or another bad argument.

    Example:
        >>> g = InvUNet(ndim=3, latent_dim=32, out_size=(16, 32, 32), channels=(16, 8, 8, 4, 4))
        >>> x = g(torch.randn(2, 32))
        >>> x.shape, bool(x.min() >= -1 and x.max() <= 1)
        (torch.Size([2, 1, 16, 32, 32]), True)
    """

    default_channels = (256, 128, 64, 32, 16)

    def build_body(self, config: GeneratorConfig) -> None:
        self.memory_cache = MemoryCacheBranch(config.ndim, config.channels)
        self.inversion = InversionBranch(config.ndim, config.channels)

    def body(self, bottleneck: torch.Tensor) -> torch.Tensor:
        priors = self.memory_cache(bottleneck)  # [(B, 128, *2S), ..., (B, 16, *16S)]
        return self.inversion(bottleneck, priors)  # (B, 16, *out_size)
