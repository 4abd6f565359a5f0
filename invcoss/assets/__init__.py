"""The default models packaged with invcoss: one small MAE per modality and its feature statistics.

Each folder ``invcoss/assets/<modality>/`` (``ct``, ``mri``, ``xray``, ``pathology``) holds

- ``config.json`` + ``model.safetensors``: a checkpoint (``MAE.from_pretrained`` reads it; the
  weights are stored in float16 and loaded as float32);
- ``stats.safetensors``: its per-block feature statistics over the phantom data it was trained on
  (:func:`invcoss.feature_stats.load_feature_stats`);
- ``asset.json``: how it was made (seeds, data, epochs, losses).

The model is the ``vit_nano`` preset at width 64 (``embed_dim=64``; the checkpoint records every
field), pre-trained with the library behind ``invcoss-cli pretrain`` on procedural phantoms.
``make assets`` (``python -m invcoss.assets.build``) rebuilds all four with fixed seeds.

Example:
    >>> model, stats = load_default("ct")
    >>> model.config.embed_dim, stats.modality, stats.input_size
    (64, 'ct', (16, 96, 96))
"""

from __future__ import annotations

from pathlib import Path

from invcoss.feature_stats import load_feature_stats
from invcoss.modality import canonical_modality
from invcoss.models import MAE

__all__ = ["ASSETS_DIR", "available", "default_model_dir", "load_default"]

ASSETS_DIR = Path(__file__).resolve().parent
STATS_NAME = "stats.safetensors"


def default_model_dir(modality: str) -> Path:
    """The packaged checkpoint folder of ``modality`` (``path`` is accepted for pathology).

    Raises:
        ValueError: an unknown modality.
        FileNotFoundError: the folder is missing (rebuild with ``make assets``).
    """

    folder = ASSETS_DIR / canonical_modality(modality)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the packaged {modality} model is missing from {folder}; rebuild it with `make assets`"
        )
    return folder


def available() -> list[str]:
    """Modalities with a packaged model."""
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "model.safetensors").is_file())


def load_default(modality: str):
    """``(model, stats)``: the packaged MAE of ``modality`` (float32, eval mode) and its statistics."""

    folder = default_model_dir(modality)
    model = MAE.from_pretrained(folder).float().eval()
    stats = load_feature_stats(folder / STATS_NAME, model, modality=folder.name)
    return model, stats
