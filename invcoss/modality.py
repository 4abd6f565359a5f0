"""The modalities: one registry of what every part of invcoss needs to know about each.

A :class:`Modality` holds its canonical name, the aliases users may type, whether its samples are
2D images or 3D volumes, and its :class:`InputSpace` (value range, channels, physical extent, how
generator output maps into the model's input). Data preprocessing, inversion, continual training
and the CLI all read these facts from here (the module does not import torch, so the CLI's
``--help`` stays instant).

Input spaces: the generator's output activation and the map into the model's input space, per
modality (:data:`INPUT_SPACES`, one per :class:`Modality`):

- ``ct``: Tanh, identity: HU/1024 in [-1, 1] (the CT window [-1024, 1024] HU of Appendix A.1).
- ``mri``: Tanh times ``s``: z-scored intensity in [-s, s], where ``s`` is the largest magnitude of
  the values of the data the statistics were collected from (recorded in the statistics file,
  :meth:`InputSpace.fitted`; real z-scored scans reach 7 or more, the packaged phantoms 3.4), so the
  samples span the intensities the model saw; 4 for statistics that record no range. A bounded map
  keeps the optimisation away from the extreme values an unbounded output reaches when the
  statistics pull on it.
- ``xray``: Sigmoid, one grey channel replicated to the model's three (as the X-ray preprocessing
  does), in [0, 1].
- ``pathology``: Sigmoid, three channels in [0, 1].

Example:
    >>> get_modality("path").name, get_modality("CT").ndim, get_modality("xray").space.value_range
    ('pathology', 3, (0.0, 1.0))
    >>> modality_names(ndim=3)
    ('ct', 'mri')
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "INPUT_SPACES",
    "MODALITIES",
    "InputSpace",
    "Modality",
    "canonical_modality",
    "get_modality",
    "modality_choices",
    "modality_names",
]


@dataclass(frozen=True)
class InputSpace:
    """How generator output becomes a model input for one modality.

    Attributes:
        modality: the canonical name.
        ndim: 2 (images) or 3 (volumes).
        activation: the generator's output activation, ``"tanh"`` or ``"sigmoid"``.
        scale: model input = ``scale`` x activated output.
        channels: channels the generator makes (X-ray: 1, replicated to the model's channels).
        fov_mm: nominal physical extent ``(D, H, W)`` of one sample of the paper's data (3D;
            informative). Synthetic volumes are written with the spacing of the data the model
            saw instead: :func:`invcoss.inversion.files.written_spacing` (the statistics' data's).
        display_range: values mapped to black and white in previews.
        description: what the model-input values mean (stored in the manifest).
        file_scale: value in a written volume = ``file_scale`` x model input (CT: 1024, so NIfTI
            files hold Hounsfield units that a viewer's CT windows show as they are).
        file_values: what a written volume's values are (stored in the manifest).
        fit_to_data: ``scale`` follows the value range of the data (:meth:`fitted`; MRI, whose
            z-scores have no fixed bound), rather than a fixed window (CT, [0, 1] images).
    """

    modality: str
    ndim: int
    activation: str
    scale: float
    channels: int
    fov_mm: tuple[float, float, float] | None
    display_range: tuple[float, float]
    description: str
    file_scale: float = 1.0
    file_values: str = "the model input"
    fit_to_data: bool = False

    @property
    def value_range(self) -> tuple[float, float]:
        """The range of model-input values the generator can produce (MRI: about +-4 std)."""
        low = -self.scale if self.activation == "tanh" else 0.0
        return (low, self.scale)

    def fitted(self, value_min: float | None, value_max: float | None) -> InputSpace:
        """This space with the generator's range fitted to data whose values lie in
        ``[value_min, value_max]``: for a ``fit_to_data`` space (MRI) ``scale`` becomes
        ``max(|value_min|, |value_max|)`` (rounded to 1e-4), so the tanh output covers every value
        the data hold and keeps 0 (the z-score mean) at its centre; any other space, or an unknown
        or empty range, is returned as it is.

        Example:
            >>> INPUT_SPACES["mri"].fitted(-1.2, 7.5).value_range, INPUT_SPACES["ct"].fitted(-1.2, 7.5).scale
            ((-7.5, 7.5), 1.0)
        """
        if not self.fit_to_data or value_min is None or value_max is None:
            return self
        scale = round(max(abs(float(value_min)), abs(float(value_max))), 4)
        if not 0 < scale < float("inf"):
            return self
        description = self.description.replace(f"{self.scale:g}*tanh", f"{scale:g}*tanh").replace(
            f"[-{self.scale:g}, {self.scale:g}]",
            f"[-{scale:g}, {scale:g}] (the range of the statistics' data)",
        )
        return replace(self, scale=scale, description=description)

    def to_model_input(self, raw: torch.Tensor, in_chans: int) -> torch.Tensor:
        """``(B, channels, *S)`` activated generator output → ``(B, in_chans, *S)`` model input."""
        x = raw * self.scale if self.scale != 1.0 else raw
        if x.shape[1] != in_chans:
            x = x.expand(-1, in_chans, *x.shape[2:])
        return x

    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Random noise in the model's input space (the baseline of the quality report).

        Uniform over the range for CT and 2D (grey replicated for X-ray), standard normal for MRI
        (z-scored noise). ``shape`` is the model input shape ``(B, C, *S)``.
        """
        import torch  # here, not at the top: the CLI reads the registry before it loads torch

        if self.modality == "mri":
            return torch.randn(shape, generator=generator)
        one = (shape[0], self.channels, *shape[2:])
        x = torch.rand(one, generator=generator)
        x = x * 2 - 1 if self.activation == "tanh" else x
        return x.expand(shape).contiguous()

    def spacing(self, size: tuple[int, ...]) -> tuple[float, ...] | None:
        """Nominal voxel spacing in mm for a sample of ``size`` (None for 2D)."""
        if self.fov_mm is None:
            return None
        return tuple(round(f / s, 4) for f, s in zip(self.fov_mm, size))


INPUT_SPACES: dict[str, InputSpace] = {
    # Paper CT: windows of 24 slices at 1 mm resized to 16; a 384 mm axial field of view.
    "ct": InputSpace(
        "ct", 3, "tanh", 1.0, 1, (24.0, 384.0, 384.0), (-1.0, 1.0),
        "CT as HU/1024 in [-1, 1] (window [-1024, 1024] HU): multiply by 1024 for Hounsfield units",
        file_scale=1024.0, file_values="Hounsfield units (model input x 1024), float32",
    ),
    # Paper MRI: windows of 16 slices (about 1 mm) resized to 16; a 240 mm field of view.
    "mri": InputSpace(
        "mri", 3, "tanh", 4.0, 1, (16.0, 240.0, 240.0), (-1.0, 3.0),
        "MRI z-scored intensity (per-volume mean 0, std 1), 4*tanh of the generator output, in [-4, 4]",
        fit_to_data=True,
    ),
    "xray": InputSpace(
        "xray", 2, "sigmoid", 1.0, 1, None, (0.0, 1.0),
        "X-ray grey value in [0, 1], replicated to the model's 3 channels",
    ),
    "pathology": InputSpace(
        "pathology", 2, "sigmoid", 1.0, 3, None, (0.0, 1.0), "RGB in [0, 1]",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Modality:
    """One imaging modality.

    Attributes:
        name: the canonical name (``ct``, ``mri``, ``xray``, ``pathology``).
        ndim: 2 (images) or 3 (volumes).
        aliases: other names accepted wherever a modality is given (case-insensitive).
        space: its :class:`InputSpace`.
    """

    name: str
    ndim: int
    aliases: tuple[str, ...]
    space: InputSpace


MODALITIES: dict[str, Modality] = {
    name: Modality(name, space.ndim, {"pathology": ("path",)}.get(name, ()), space)
    for name, space in INPUT_SPACES.items()
}
_ALIASES = {alias: m.name for m in MODALITIES.values() for alias in m.aliases}


def canonical_modality(name: str) -> str:
    """``ct``, ``mri``, ``xray`` or ``pathology`` (``path`` is accepted for pathology).

    Raises:
        ValueError: an unknown modality.

    Example:
        >>> canonical_modality("path"), canonical_modality("CT")
        ('pathology', 'ct')
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; choose one of {', '.join(modality_choices())}")
    return key


def get_modality(name: str) -> Modality:
    """The :class:`Modality` of ``name`` (or of one of its aliases).

    Raises:
        ValueError: an unknown modality.
    """
    return MODALITIES[canonical_modality(name)]


def modality_names(ndim: int | None = None) -> tuple[str, ...]:
    """Canonical names in registry order, optionally only the 2D or only the 3D ones."""
    return tuple(m.name for m in MODALITIES.values() if ndim is None or m.ndim == ndim)


def modality_choices() -> list[str]:
    """Every name a user may give: the canonical names, then the aliases."""
    return [*MODALITIES, *_ALIASES]
