"""Generator building blocks of the paper's Fig. 8 (left panels) and the generators' config.

``ConvBlock`` (two conv-norm-activation), ``UpBlock`` (2x upsampling then a ConvBlock) and
``NoiseProjector`` (latent → linear → normalisation → activation, reshaped to the bottleneck) are
shared by :class:`~invcoss.models.InvUNet` and :class:`~invcoss.models.BottomUpGenerator`.

Conventions (Appendix B.3): 2D uses bilinear upsampling and BatchNorm; 3D uses trilinear upsampling
and InstanceNorm (affine, no running statistics) so that every volume is normalised on its own.
The activation is LeakyReLU(0.2), the usual choice of generator-based model inversion (the paper
does not name one). Convolutions followed by a normalisation carry no bias (the norm's shift
replaces it); all convolutions are 3 wide per axis with padding 1, so they keep the size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from invcoss.models.checkpoint import PretrainedMixin

__all__ = [
    "ConvBlock",
    "GeneratorConfig",
    "LatentGenerator",
    "LinearUpsample2x",
    "NoiseProjector",
    "UpBlock",
    "conv_layer",
    "norm_layer",
    "output_activation",
    "upsample2x_linear",
    "upsample_layer",
]

OUTPUT_ACTIVATIONS = ("sigmoid", "tanh", "none")
_DEFAULTS = {  # per ndim: latent_dim, out_size, out_channels, out_activation (paper, Appendix C)
    2: (128, (224, 224), 3, "sigmoid"),
    3: (512, (16, 192, 192), 1, "tanh"),
}


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that describes an InvUNet or a BottomUpGenerator (JSON-serialisable).

    Attributes:
        ndim: 2 (images) or 3 (volumes).
        latent_dim: size of z; default 128 (2D) / 512 (3D), as Appendix C.
        out_size: output spatial size, an int (same on every axis) or one per axis; default
            224x224 (2D) / 16x192x192 (3D). Each axis must be divisible by ``upsample_factor``.
        channels: bottleneck channels first, then one entry per 2x upsampling level.
        out_channels: default 3 (2D) / 1 (3D).
        out_activation: ``"sigmoid"`` ([0, 1], 2D default), ``"tanh"`` ([-1, 1], 3D default) or
            ``"none"`` (for z-scored targets such as MRI).

    Example:
        >>> GeneratorConfig(ndim=3, out_size=(16, 64, 64)).bottleneck_size
        (1, 4, 4)
    """

    ndim: int = 2
    latent_dim: int | None = None
    out_size: int | tuple[int, ...] | None = None
    channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    out_channels: int | None = None
    out_activation: str | None = None

    # Fields that may differ when loading with strict=False: none, every field shapes the weights
    # or the output.
    runtime_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.ndim not in _DEFAULTS:
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        latent_dim, out_size, out_channels, out_activation = _DEFAULTS[self.ndim]
        size = out_size if self.out_size is None else self.out_size
        size = (size,) * self.ndim if isinstance(size, int) else tuple(size)
        values = {
            "latent_dim": latent_dim if self.latent_dim is None else self.latent_dim,
            "out_size": size,
            "channels": tuple(self.channels),
            "out_channels": out_channels if self.out_channels is None else self.out_channels,
            "out_activation": out_activation if self.out_activation is None else self.out_activation,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if len(self.out_size) != self.ndim:
            raise ValueError(
                f"out_size must have {self.ndim} entries for ndim={self.ndim}, got {self.out_size}"
            )
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels needs at least two positive entries, got {self.channels}")
        if self.latent_dim < 1 or self.out_channels < 1:
            raise ValueError(
                f"latent_dim and out_channels must be positive, got {self.latent_dim}, {self.out_channels}"
            )
        if self.out_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"out_activation must be one of {OUTPUT_ACTIVATIONS}, got {self.out_activation!r}"
            )
        factor = self.upsample_factor
        if any(s % factor or s < factor for s in self.out_size):
            raise ValueError(
                f"out_size {self.out_size} must be a positive multiple of {factor} on every axis "
                f"({len(self.channels) - 1} levels of 2x upsampling for channels {self.channels})"
            )

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def bottleneck_size(self) -> tuple[int, ...]:
        return tuple(s // self.upsample_factor for s in self.out_size)

    def replace(self, **changes: object) -> GeneratorConfig:
        return dataclasses.replace(self, **changes)


def conv_layer(ndim: int, in_channels: int, out_channels: int, bias: bool = False) -> nn.Module:
    """A size-preserving 3x3 (2D) or 3x3x3 (3D) convolution."""
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)


def norm_layer(ndim: int, channels: int) -> nn.Module:
    """BatchNorm (2D) or affine InstanceNorm (3D, batch independent), as Appendix B.3."""
    if ndim == 2:
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm3d(channels, affine=True)


def upsample_layer(ndim: int) -> nn.Module:
    """2x upsampling on every spatial axis: bilinear (2D) or trilinear (3D)."""
    return LinearUpsample2x(ndim)


def upsample2x_linear(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """2x linear upsampling of ``x`` along ``dims`` (non-negative axes), as ``F.interpolate`` in its
    bilinear / trilinear modes with ``align_corners=False`` computes it, one axis after another.

    Output ``2i`` is ``x[i-1] / 4 + 3 x[i] / 4`` and output ``2i + 1`` is ``3 x[i] / 4 + x[i+1] / 4``,
    with ``x[-1] = x[0]`` and ``x[n] = x[n-1]`` (the clamped edges). Made of slices, a concatenation,
    products and a stack only, in fp32 at least (returned in x's dtype), so its backward holds no scatter:
    that of ``F.interpolate`` adds into zeros with an index scatter, which torch 2.11's inductor
    ordered after the kernel that reads the result (every gradient before the upsampling was zero).

    Example:
        >>> x = torch.rand(2, 3, 5, 7)
        >>> want = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        >>> torch.allclose(upsample2x_linear(x, (2, 3)), want, atol=1e-6)
        True
    """
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    for d in dims:
        n = x.shape[d]
        padded = torch.cat([x.narrow(d, 0, 1), x, x.narrow(d, n - 1, 1)], dim=d)  # (..., n + 2, ...)
        before, after = padded.narrow(d, 0, n), padded.narrow(d, 2, n)
        even = 0.25 * before + 0.75 * x
        odd = 0.75 * x + 0.25 * after
        x = torch.stack([even, odd], dim=d + 1).flatten(d, d + 1)
    return x.to(dtype)


class LinearUpsample2x(nn.Module):
    """2x bilinear (2D) or trilinear (3D) upsampling with ``align_corners=False``, as ``nn.Upsample``.

    Eagerly one ``F.interpolate`` kernel; under ``torch.compile`` :func:`upsample2x_linear`, the
    same values up to rounding, whose backward inductor compiles right on every torch release we
    test (see there). No parameters: checkpoints of ``nn.Upsample`` generators load unchanged.

    Example:
        >>> LinearUpsample2x(3)(torch.rand(1, 2, 3, 4, 5)).shape
        torch.Size([1, 2, 6, 8, 10])
    """

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = ndim
        self.mode = "bilinear" if ndim == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return upsample2x_linear(x, range(x.ndim - self.ndim, x.ndim))
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def output_activation(name: str) -> nn.Module:
    """The final activation: Sigmoid, Tanh or none."""
    return {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}[name]()


class ConvBlock(nn.Sequential):
    """Two consecutive conv → norm → activation, keeping the spatial size.

    ``x: (B, C_in, *S)`` → ``(B, C_out, *S)``.

    Example:
        >>> ConvBlock(2, 8, 4)(torch.rand(2, 8, 6, 6)).shape
        torch.Size([2, 4, 6, 6])
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv_layer(ndim, in_channels, out_channels),
            norm_layer(ndim, out_channels),
            nn.LeakyReLU(0.2),
            conv_layer(ndim, out_channels, out_channels),
            norm_layer(ndim, out_channels),
            nn.LeakyReLU(0.2),
        )


class UpBlock(nn.Module):
    """2x upsampling, optionally concatenated with a skip at the new size, then a ConvBlock.

    ``x: (B, C_in, *S)``, ``skip: (B, C_skip, *2S)`` → ``(B, C_out, *2S)``.

    Example:
        >>> up = UpBlock(3, 8, 4, skip_channels=2)
        >>> up(torch.rand(1, 8, 1, 3, 3), torch.rand(1, 2, 2, 6, 6)).shape
        torch.Size([1, 4, 2, 6, 6])
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.up = upsample_layer(ndim)
        self.conv = ConvBlock(ndim, in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)  # (B, C_in, *2S)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, C_in + C_skip, *2S)
        return self.conv(x)


class NoiseProjector(nn.Module):
    """Bottleneck injection: latent → linear → reshape → normalisation → activation.

    ``z: (B, latent_dim)`` → ``(B, channels, *grid)``. The linear layer holds most of a 2D
    InvUNet's parameters (128 x 256 x 14 x 14 = 6.4M), which is why the paper's 7.7M is so small.

    Example:
        >>> NoiseProjector(2, 16, 8, (3, 3))(torch.randn(2, 16)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(self, ndim: int, latent_dim: int, channels: int, grid: tuple[int, ...]) -> None:
        super().__init__()
        self.channels, self.grid = channels, tuple(grid)
        self.linear = nn.Linear(latent_dim, channels * math.prod(self.grid))
        self.norm = norm_layer(ndim, channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z).view(z.shape[0], self.channels, *self.grid)  # (B, C, *grid)
        return self.act(self.norm(x))


class LatentGenerator(PretrainedMixin, nn.Module):
    """What InvUNet and BottomUpGenerator share: ``z`` → NoiseProjector → body → conv → activation.

    A subclass sets ``default_channels`` and implements ``build_body`` (create its layers) and
    ``body`` (bottleneck ``(B, channels[0], *out_size / 2**n)`` → ``(B, channels[-1], *out_size)``).
    The constructor arguments are the fields of :class:`GeneratorConfig`; ``channels=None`` means
    ``default_channels``.
    """

    config_class = GeneratorConfig
    default_channels: ClassVar[tuple[int, ...]] = GeneratorConfig.channels

    def __init__(
        self,
        ndim: int = 2,
        latent_dim: int | None = None,
        out_size: int | tuple[int, ...] | None = None,
        channels: tuple[int, ...] | None = None,
        out_channels: int | None = None,
        out_activation: str | None = None,
    ) -> None:
        super().__init__()
        channels = self.default_channels if channels is None else tuple(channels)
        self.config = cfg = GeneratorConfig(
            ndim, latent_dim, out_size, channels, out_channels, out_activation
        )
        self.noise_projector = NoiseProjector(cfg.ndim, cfg.latent_dim, cfg.channels[0], cfg.bottleneck_size)
        self.build_body(cfg)
        self.final_conv = conv_layer(cfg.ndim, cfg.channels[-1], cfg.out_channels, bias=True)
        self.final_act = output_activation(cfg.out_activation)

    def build_body(self, config: GeneratorConfig) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement build_body")

    def body(self, bottleneck: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement body")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (B, latent_dim)`` → ``(B, out_channels, *out_size)``."""
        latent_dim = self.config.latent_dim
        if z.ndim != 2 or z.shape[1] != latent_dim:
            raise ValueError(
                f"{type(self).__name__} expects z of shape (B, {latent_dim}), got {tuple(z.shape)}"
            )
        x = self.body(self.noise_projector(z))  # (B, channels[-1], *out_size)
        return self.final_act(self.final_conv(x))
